"""The planner's store on both engines, for the store tests: ``store_where`` (an SQLite file, or a fresh
database on the module's PostgreSQL server, tests.postgres_server: skipped with the reason where none can
start) and ``store`` (a Store opened there, closed after). A plugin of tests/conftest.py: every test module may ask for them.
A module that defines its own ``store`` fixture uses that one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from planner.store import Store
from tests.postgres_server import postgres  # noqa: F401 - the fixture store_where asks for by name


@pytest.fixture(params=("sqlite", "postgresql"))
def store_where(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "s.sqlite")
    return str(request.getfixturevalue("postgres").new_database())


@pytest.fixture()
def store(store_where: str) -> Iterator[Store]:
    s = Store(store_where)
    yield s
    s.close()
