"""A throw-away PostgreSQL server: ``initdb`` in a temporary folder, listening on a Unix socket in that
folder only (no TCP port to collide with), trust authentication, removed by :meth:`TempPostgres.stop`.

Used by ``edgesplit bench-planner-fleet --store postgresql`` (planner replicas on a shared store) and
by the planner's store tests (tests/postgres_server.py). ``initdb`` refuses to run as root: as root
the server runs as ``nobody`` (``runuser``). Where no PostgreSQL server binaries are found or the
server does not start, :class:`runtime.contracts.errors.Unavailable` says why.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile

from runtime.contracts.errors import Unavailable

USER = "edgesplit"
PORT = 5432  # the socket file's name only (.s.PGSQL.5432 in the temp folder): no TCP listener
MAX_CONNECTIONS = 100  # each planner replica opens up to 4 (its store, the store thread, 2 attachment threads)


def bin_dir() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(found)
    for d in [*sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True), "/usr/local/bin", "/usr/local/pgsql/bin"]:
        if os.path.exists(os.path.join(d, "pg_ctl")) and os.path.exists(os.path.join(d, "initdb")):
            return d
    return None


class TempPostgres:
    def __init__(self) -> None:
        found = bin_dir()
        if found is None:
            raise Unavailable("no PostgreSQL server binaries (initdb, pg_ctl) on this machine: apt-get install postgresql")
        self.bin = found
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise Unavailable("running as root and no runuser to start PostgreSQL as another user (initdb refuses root)")
            self.as_user = ["runuser", "-u", "nobody", "--"]
        self.dir = tempfile.mkdtemp(prefix="edgesplit-pg-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        if self.as_user:
            shutil.chown(self.dir, "nobody")
        self.data = os.path.join(self.dir, "data")
        self.started = False

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout)

    def start(self) -> TempPostgres:
        r = self._run(os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust", "-U", USER, "--no-sync",
                      "-E", "UTF8")
        if r.returncode != 0:
            self.cleanup()
            raise Unavailable(f"initdb failed: {(r.stderr or r.stdout).strip()[-300:]}")
        opts = f"-p {PORT} -k {self.dir} -c listen_addresses='' -c fsync=off -c max_connections={MAX_CONNECTIONS}"
        r = self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-o", opts, "-l",
                      os.path.join(self.dir, "log"), "-w", "-t", "30", "start")
        if r.returncode != 0:
            log_file = os.path.join(self.dir, "log")
            log = ""
            if os.path.exists(log_file):
                with open(log_file) as f:
                    log = f.read()[-300:]
            self.cleanup()
            raise Unavailable(f"PostgreSQL did not start: {(r.stderr or r.stdout).strip()[-200:]} {log}")
        self.started = True
        return self

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

    def pids(self) -> list[int]:
        """The server's processes: the postmaster (first line of ``postmaster.pid``) and its children
        (backends it forks later inherit its CPU affinity). Empty when it is not running."""
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                root = int(f.readline())
        except (OSError, ValueError):
            return []
        out = [root]
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                with open(stat) as f:
                    text = f.read()
            except OSError:
                continue
            if int(text[text.rindex(")") + 2:].split()[1]) == root:  # field 4: the parent's pid
                out.append(int(stat.split("/")[2]))
        return out

    def cpu_seconds(self) -> float:
        """CPU seconds the server used so far: the postmaster, its live children and those that exited
        (the postmaster's cutime/cstime). 0.0 when it is not running."""
        total = 0.0
        for k, pid in enumerate(self.pids()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()  # utime, stime, cutime, cstime: fields 14-17
            total += sum(int(x) for x in fields[11:15 if k == 0 else 13]) / os.sysconf("SC_CLK_TCK")
        return total

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
