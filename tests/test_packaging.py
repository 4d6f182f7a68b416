"""The wheel holds exactly the ``agentcoord`` package and works without the source tree.

Builds a wheel offline (``--no-build-isolation``: setuptools comes from the venv) from a copy
of the files a source distribution needs, compares its file list with ``services/`` and
``generated/``, installs it with ``--target`` into a temporary folder and imports the
hand-written and generated modules from there, in a subprocess that cannot see the editable
install's source tree. About 10-20 s, so it carries a generous timeout of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ROOT / "services" / "agentcoord"
GENERATED = ROOT / "generated" / "agentcoord"
PACKAGED_SUFFIXES = (".py", ".pyi", ".sql", ".typed", ".html", ".css", ".js")

pytestmark = pytest.mark.timeout(180)


def expected_files() -> set[str]:
    """Paths the wheel must hold: every module, stub, migration and py.typed, by import path."""
    found = set()
    for base, prefix in ((SERVICES, "agentcoord"), (GENERATED, "agentcoord")):
        for path in base.rglob("*"):
            if (
                path.is_file()
                and path.suffix in PACKAGED_SUFFIXES
                and "__pycache__" not in path.parts
            ):
                found.add(f"{prefix}/{path.relative_to(base).as_posix()}")
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Build the wheel from a clean copy of the tree, so no build output lands in the repo.

    Returns the wheel and what the build printed.
    """
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("services", "generated"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheelhouse")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    (built,) = out.glob("agentcoord-*.whl")
    return built, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(built: tuple[Path, str]) -> Path:
    """The wheel file."""
    return built[0]


def test_build_prints_no_warning(built: tuple[Path, str]) -> None:
    # setuptools' BuildBackendWarning about packages missing from pyproject.toml's list
    # (once ~90 lines about the migrations folders in every `make venv` and `make run`).
    output = built[1]
    assert "Warning" not in output and "warning" not in output, output


def test_wheel_holds_exactly_the_agentcoord_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {name for name in names if not name.startswith("agentcoord-")}  # not .dist-info
    assert all(name.startswith("agentcoord/") for name in package), sorted(
        name for name in package if not name.startswith("agentcoord/")
    )
    assert not any(name.startswith(("services/", "generated/")) for name in names)
    for required in (
        "agentcoord/__init__.py",
        "agentcoord/py.typed",
        "agentcoord/discovery/v1/discovery_service_pb2.py",
        "agentcoord/discovery/v1/discovery_service_pb2.pyi",
        "agentcoord/discovery/v1/discovery_service_pb2_grpc.py",
        "agentcoord/discovery/v1/discovery_service_pb2_grpc.pyi",
    ):
        assert required in names, f"{required} is missing from {wheel.name}"
    for backend in ("sqlite", "postgres"):
        migrations = {n for n in names if n.startswith(f"agentcoord/store/{backend}/migrations/")}
        in_tree = {
            f"agentcoord/store/{backend}/migrations/{path.name}"
            for path in (SERVICES / "store" / backend / "migrations").glob("*.sql")
        }
        assert in_tree and migrations == in_tree, f"{backend} migrations: {sorted(migrations)}"
    expected = expected_files()
    missing, extra = expected - package, package - expected
    assert not missing, (
        f"in the source tree but not in the wheel (add the package to [tool.setuptools] "
        f"packages in pyproject.toml?): {sorted(missing)}"
    )
    assert not extra, f"in the wheel but not in services/ or generated/: {sorted(extra)}"


IMPORT_CHECK = """
import sys
site = sys.argv[1]
sys.path.insert(0, site)
import importlib.resources
import agentcoord
import agentcoord.server.app
from agentcoord.discovery.v1 import discovery_service_pb2_grpc
from agentcoord.distribution.v1 import distribution_service_pb2_grpc
from agentcoord.statesync.v1 import statesync_service_pb2_grpc
for module in (agentcoord, agentcoord.server.app, discovery_service_pb2_grpc,
               distribution_service_pb2_grpc, statesync_service_pb2_grpc):
    assert module.__file__.startswith(site), f"{module.__name__} came from {module.__file__}"
for backend in ("sqlite", "postgres"):
    folder = importlib.resources.files(f"agentcoord.store.{backend}") / "migrations"
    assert any(p.name.endswith(".sql") for p in folder.iterdir()), f"no {backend} migrations"
print("ok")
"""


def test_wheel_installs_and_imports_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--target", str(site), str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert install.returncode == 0, f"pip install failed:\n{install.stdout}\n{install.stderr}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -I: no PYTHONPATH, no user site, no cwd on sys.path; dependencies still come from the
    # venv's site-packages. The editable install's finder is consulted after sys.path, so
    # the check that every module came from ``site`` proves the wheel alone served them.
    result = subprocess.run(
        [sys.executable, "-I", "-c", IMPORT_CHECK, str(site)],
        cwd=elsewhere, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
