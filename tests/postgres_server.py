"""A throw-away PostgreSQL server for the planner's store tests (tests/test_planner_store*.py,
tests/test_planner_replicas.py): initdb in a temp folder, listening on a Unix socket in that folder
only (no TCP port to collide with), trust authentication, torn down when the fixture ends.

``initdb`` refuses to run as root: as root the server runs as ``nobody`` (``runuser``). Where no
PostgreSQL binaries are found or the server does not start, the tests that need it skip and say why.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile

import pytest

USER = "edgesplit"
PORT = 5432  # the socket file's name only (.s.PGSQL.5432 in the temp folder): no TCP listener


def _bin_dir() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(found)
    for d in [*sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True), "/usr/local/bin", "/usr/local/pgsql/bin"]:
        if os.path.exists(os.path.join(d, "pg_ctl")) and os.path.exists(os.path.join(d, "initdb")):
            return d
    return None


class PostgresServer:
    def __init__(self):
        self.bin = _bin_dir()
        if self.bin is None:
            pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine: apt-get install postgresql")
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                pytest.skip("running as root and no runuser to start PostgreSQL as another user (initdb refuses root)")
            self.as_user = ["runuser", "-u", "nobody", "--"]
        self.dir = tempfile.mkdtemp(prefix="edgesplit-pg-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        if self.as_user:
            shutil.chown(self.dir, "nobody")
        self.data = os.path.join(self.dir, "data")
        self.started = False

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        r = self._run(os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust", "-U", USER, "--no-sync",
                      "-E", "UTF8")
        if r.returncode != 0:
            self.cleanup()
            pytest.skip(f"initdb failed, no PostgreSQL for this test: {(r.stderr or r.stdout).strip()[-300:]}")
        opts = f"-p {PORT} -k {self.dir} -c listen_addresses='' -c fsync=off -c max_connections=50"
        r = self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-o", opts, "-l",
                      os.path.join(self.dir, "log"), "-w", "-t", "30", "start")
        if r.returncode != 0:
            log_file = os.path.join(self.dir, "log")
            log = ""
            if os.path.exists(log_file):
                with open(log_file) as f:
                    log = f.read()[-300:]
            self.cleanup()
            pytest.skip(f"PostgreSQL did not start: {(r.stderr or r.stdout).strip()[-200:]} {log}")
        self.started = True

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{USER}@/{db}?host={self.dir}&port={PORT}"

    def new_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        import psycopg

        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
            self.started = False
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server for this test module (skips with the reason when none can start)."""
    pytest.importorskip("psycopg", reason="psycopg (the planner's PostgreSQL driver) is not installed")
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
