"""A throw-away PostgreSQL server for the planner's store tests (tests/test_planner_store*.py,
tests/test_planner_replicas.py): runtime.measure.fleet.postgres.TempPostgres (initdb in a temp
folder, a Unix socket in that folder only, trust authentication), torn down when the fixture ends.
Where no PostgreSQL binaries are found or the server does not start, the tests that need it skip
and say why.
"""

from __future__ import annotations

import pytest

from runtime.contracts.errors import Unavailable
from runtime.measure.fleet.postgres import TempPostgres


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server for this test module (skips with the reason when none can start)."""
    pytest.importorskip("psycopg", reason="psycopg (the planner's PostgreSQL driver) is not installed")
    try:
        server = TempPostgres().start()
    except Unavailable as e:
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()
