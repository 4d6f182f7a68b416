"""Store URLs and the implementation each one opens."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentcoord.core.errors import InvalidInput
from agentcoord.store.factory import open_store
from agentcoord.store.postgres import PostgresStore
from agentcoord.store.sqlite import SqliteStore


def test_sqlite_relative_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///var/agentcoord.db")
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "var" / "agentcoord.db"


def test_sqlite_absolute_path(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/a.db")
    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "a.db"


async def test_sqlite_creates_the_parent_folder(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/deep/er/a.db")
    await store.open()
    await store.close()
    assert (tmp_path / "deep" / "er" / "a.db").is_file()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgres_urls(scheme: str) -> None:
    assert isinstance(open_store(f"{scheme}://u@h:5432/db"), PostgresStore)
    assert isinstance(open_store(f"{scheme}://u@h/db?schema=s1&sslmode=disable"), PostgresStore)


@pytest.mark.parametrize(
    "url",
    ["mysql://x/db", "agentcoord.db", "sqlite://relative.db", "sqlite:///", "", "memory://"],
)
def test_bad_urls_name_the_store_field(url: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        open_store(url)
    assert raised.value.field == "store"


def test_schema_must_be_an_identifier() -> None:
    with pytest.raises(InvalidInput) as raised:
        open_store('postgresql://u@h/db?schema=x";drop')
    assert raised.value.field == "store"
