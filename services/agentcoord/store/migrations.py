"""Numbered SQL migrations shipped as package data, shared by both back ends.

Each back end keeps its files in its own ``migrations/`` folder, named
``NNNN_name.sql`` and numbered from 0001 without gaps. Applied versions are recorded
in the ``schema_migrations`` table (version, name, applied_at); each back end applies
the pending ones in order, in one transaction that also records them.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources

_FILE_NAME = re.compile(r"(\d{4})_(\w+)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema migration."""

    version: int
    """Number from the file name; applied in increasing order."""
    name: str
    """Rest of the file name, without the ``.sql`` suffix."""
    sql: str
    """The statements to run."""


def load_migrations(package: str) -> list[Migration]:
    """Return the migrations in ``package``'s ``migrations`` folder, in version order.

    Raises:
        ValueError: the versions are not 1, 2, 3, ... without gaps or duplicates.
    """
    migrations = []
    for entry in (resources.files(package) / "migrations").iterdir():
        match = _FILE_NAME.fullmatch(entry.name)
        if match is not None:
            sql = entry.read_text(encoding="utf-8")
            migrations.append(Migration(int(match[1]), match[2], sql))
    migrations.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise ValueError(f"migrations of {package} are not numbered 1..n: {versions}")
    return migrations


def pending_migrations(migrations: list[Migration], applied: Collection[int]) -> list[Migration]:
    """Return the migrations whose version is not in ``applied``, in order."""
    return [migration for migration in migrations if migration.version not in applied]
