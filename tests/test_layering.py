"""Import-direction rules of docs/architecture.md ("Layers"), checked by parsing every module.

Every module under ``services/agentcoord`` belongs to exactly one layer below. A layer lists
the ``agentcoord`` modules it may import (prefixes), the ones it must not (they win over the
allowed ones), and the third-party top-level packages it may use (``None``: any). The
standard library is always allowed. Imports under ``if TYPE_CHECKING:`` count as well: a
type-only dependency is still a dependency of the layer.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "services"
GENERATED = ROOT / "generated"
PACKAGE = SERVICES / "agentcoord"

GENERATED_PACKAGES = tuple(
    sorted(f"agentcoord.{p.name}" for p in (GENERATED / "agentcoord").iterdir() if p.is_dir())
)
"""Import names of generated code (``agentcoord.discovery`` and so on), from generated/."""

STORE_BACKENDS = ("agentcoord.store.sqlite", "agentcoord.store.postgres")


@dataclass(frozen=True)
class Layer:
    """One row of the layer table."""

    name: str
    """The layer as docs/architecture.md names it."""
    modules: tuple[str, ...]
    """Module prefixes that belong to the layer."""
    may_import: tuple[str, ...]
    """agentcoord module prefixes it may import."""
    must_not_import: tuple[str, ...] = ()
    """agentcoord module prefixes it must not import, even when ``may_import`` covers them."""
    third_party: frozenset[str] | None = frozenset()
    """Top-level non-stdlib packages it may import; None means any."""
    excludes: tuple[str, ...] = ()
    """Module prefixes inside ``modules`` that belong to another layer."""

    def owns(self, module: str) -> bool:
        return _under(module, self.modules) and not _under(module, self.excludes)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


LAYERS = [
    Layer(
        "package root",
        modules=("agentcoord",),
        may_import=("agentcoord.client",),
        excludes=(
            "agentcoord.core",
            "agentcoord.store",
            "agentcoord.server",
            "agentcoord.client",
            "agentcoord.cli",
            "agentcoord.mcp",
            "agentcoord.telemetry",
        ),
    ),
    Layer(
        "telemetry",
        # Spans with OpenTelemetry, for the server and the client SDK alike: it knows
        # nothing of agentcoord's layers, only gRPC and OpenTelemetry.
        modules=("agentcoord.telemetry",),
        may_import=("agentcoord.telemetry",),
        third_party=frozenset({"grpc", "opentelemetry"}),
    ),
    Layer(
        "core",
        modules=("agentcoord.core",),
        # The core owns the Store protocol it is given (core.store); it imports no store.
        may_import=("agentcoord.core",),
    ),
    Layer(
        "store shared helpers",
        # agentcoord.store itself, and what both back ends share below the SQL
        # (group commit, migrations loader, row encoding, the write path). The write path
        # applies the pure rules of sessions, of a state write and of task transitions
        # (core.session_rules, core.state_rules, core.task_rules: no I/O, no clock) inside
        # the store's transaction, so that both back ends share them instead of
        # re-implementing them; the back ends themselves do not need them.
        modules=("agentcoord.store",),
        may_import=(
            "agentcoord.store",
            "agentcoord.core.store",
            "agentcoord.core.models",
            "agentcoord.core.errors",
            "agentcoord.core.session_rules",
            "agentcoord.core.state_rules",
            "agentcoord.core.tasks",
            "agentcoord.core.task_rules",
        ),
        must_not_import=(*STORE_BACKENDS, "agentcoord.store.factory"),
        excludes=(*STORE_BACKENDS, "agentcoord.store.factory"),
    ),
    Layer(
        "store.sqlite",
        modules=("agentcoord.store.sqlite",),
        may_import=("agentcoord.store", "agentcoord.core.models", "agentcoord.core.errors"),
        must_not_import=("agentcoord.store.postgres", "agentcoord.store.factory"),
        third_party=frozenset(),  # sqlite3 is in the standard library
    ),
    Layer(
        "store.postgres",
        modules=("agentcoord.store.postgres",),
        may_import=("agentcoord.store", "agentcoord.core.models", "agentcoord.core.errors"),
        must_not_import=("agentcoord.store.sqlite", "agentcoord.store.factory"),
        third_party=frozenset({"asyncpg"}),
    ),
    Layer(
        "store.factory",
        modules=("agentcoord.store.factory",),
        may_import=(
            "agentcoord.store",
            "agentcoord.core.store",
            "agentcoord.core.models",
            "agentcoord.core.errors",
        ),
        third_party=frozenset(),  # back ends import their drivers, not the factory
    ),
    Layer(
        "server (handlers and runtime)",
        modules=("agentcoord.server",),
        may_import=(
            "agentcoord.core",
            "agentcoord.server",
            "agentcoord.telemetry",
            *GENERATED_PACKAGES,
        ),
        must_not_import=(*STORE_BACKENDS, "agentcoord.store.factory"),
        third_party=None,
        excludes=("agentcoord.server.app",),
    ),
    Layer(
        "server.app (composition root)",
        modules=("agentcoord.server.app",),
        may_import=("agentcoord",),
        third_party=None,
    ),
    Layer(
        "client",
        modules=("agentcoord.client",),
        may_import=("agentcoord.client", "agentcoord.telemetry", *GENERATED_PACKAGES),
        must_not_import=("agentcoord.core", "agentcoord.store", "agentcoord.server"),
        third_party=None,
    ),
    Layer(
        "mcp",
        modules=("agentcoord.mcp",),
        # Client-side like the SDK: the wire contract and the client package only.
        may_import=("agentcoord.mcp", "agentcoord.client", *GENERATED_PACKAGES),
        must_not_import=("agentcoord.core", "agentcoord.store", "agentcoord.server"),
        third_party=frozenset({"grpc", "google", "mcp", "pydantic"}),
    ),
    Layer(
        "cli",
        modules=("agentcoord.cli",),
        may_import=("agentcoord",),
        must_not_import=("agentcoord.store",),
        third_party=None,
    ),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SERVICES).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of ours (hand-written or generated)."""
    relative = Path(*name.split("."))
    return any(
        (base / relative).with_suffix(".py").exists() or (base / relative / "__init__.py").exists()
        for base in (SERVICES, GENERATED)
    )


@dataclass(frozen=True)
class Import:
    module: str
    line: int


def imports_of(source: str, module: str, is_package: bool) -> Iterator[Import]:
    """Yield the modules ``source`` imports, relative imports resolved, submodules expanded."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, node.module] if node.module else base_parts)
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield Import(candidate if _is_module(candidate) else base, node.lineno)


def layer_of(module: str) -> Layer:
    owners = [layer for layer in LAYERS if layer.owns(module)]
    assert len(owners) == 1, (
        f"{module} belongs to {len(owners)} layers ({[layer.name for layer in owners]}); "
        "every module needs exactly one: add its layer to docs/architecture.md and LAYERS"
    )
    return owners[0]


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Return a readable line for each import that breaks the module's layer rules."""
    layer = layer_of(module)
    found = []
    for imported in imports_of(source, module, is_package):
        name = imported.module
        where = f"{module} (line {imported.line}) imports {name}"
        if name == "agentcoord" or name.startswith("agentcoord."):
            if _under(name, layer.must_not_import):
                found.append(f"{where}: the {layer.name} layer must not import it")
            elif not _under(name, layer.may_import) and name != module:
                allowed = ", ".join(layer.may_import) or "nothing of agentcoord"
                found.append(f"{where}: the {layer.name} layer may import only {allowed}")
            continue
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or layer.third_party is None:
            continue
        if top not in layer.third_party:
            allowed = ", ".join(sorted(layer.third_party)) or "the standard library only"
            found.append(f"{where}: the {layer.name} layer may use {allowed}")
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_respects_its_layer() -> None:
    problems: list[str] = []
    for path in _modules():
        module = module_name(path)
        problems.extend(
            violations(module, path.read_text(encoding="utf-8"), path.name == "__init__.py")
        )
    assert not problems, "layering violations (see docs/architecture.md):\n" + "\n".join(problems)


def test_the_scan_sees_every_layer() -> None:
    """Guards the test itself: each layer owns at least one module that exists today."""
    modules = [module_name(path) for path in _modules()]
    assert len(modules) > 20
    owned = {layer_of(module).name for module in modules}
    missing = {layer.name for layer in LAYERS} - owned
    assert not missing, f"layers without modules (stale rows?): {missing}"


CORE_CLOCK_READS = {
    ("time", "time"),
    ("time", "monotonic"),
    ("time", "perf_counter"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("os", "getenv"),
    ("os", "environ"),
}
"""Attribute reads that only core/clock.py may make: time is injected, env is never read."""


def test_core_reads_no_clock_or_environment_except_clock_module() -> None:
    problems = []
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        if path.name == "clock.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and (node.value.id, node.attr) in CORE_CLOCK_READS
            ):
                problems.append(
                    f"{module_name(path)} (line {node.lineno}) reads {node.value.id}.{node.attr}: "
                    "the core takes time from its Clock and never reads the environment"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("agentcoord.core.discovery", "import grpc", "may use the standard library only"),
        ("agentcoord.core.discovery", "from agentcoord.server import errors", "may import only"),
        (
            "agentcoord.server.discovery",
            "from agentcoord.store.sqlite import store",
            "must not import",
        ),
        ("agentcoord.store.postgres.store", "from ..sqlite import store", "must not import"),
        ("agentcoord.client._client", "from agentcoord.core import models", "must not import"),
        ("agentcoord.cli.main", "import agentcoord.store.rows", "must not import"),
        ("agentcoord.core.store", "from agentcoord.discovery.v1 import x", "may import only"),
        ("agentcoord.core.store", "from agentcoord.store import batching", "may import only"),
        ("agentcoord.core.discovery", "from agentcoord.store import rows", "may import only"),
        ("agentcoord.store.rows", "import grpc", "may use the standard library only"),
        ("agentcoord.store.batching", "from agentcoord.store.sqlite import x", "must not import"),
    ],
)
def test_checker_reports_forbidden_imports(module: str, source: str, expected: str) -> None:
    found = violations(module, source)
    assert found and expected in found[0], found


def test_checker_accepts_allowed_imports() -> None:
    assert not violations("agentcoord.core.discovery", "from agentcoord.core.store import Store")
    assert not violations("agentcoord.store.postgres.store", "import asyncpg\nfrom .. import base")
    assert not violations("agentcoord.server.app", "from agentcoord.store import factory")
