"""The planner under test: a real ``edgesplit planner serve`` subprocess on loopback with a temporary
store, its CPU and RSS read from ``/proc/<pid>``, and CPU pinning.

CPU time is ``utime + stime`` of ``/proc/<pid>/stat`` (all the process's threads); RSS is
``VmRSS`` of ``/proc/<pid>/status``. The loader's own CPU is counted per loader process with
``resource.getrusage`` and reported apart, never in the planner's figure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.contracts.errors import Unavailable
from runtime.measure.fleet import gcpauses

TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_SECONDS = 60.0  # the planner must write its port file within this long


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0.0 when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / TICKS


def sched_seconds(pid: int | str) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of all of ``pid``'s threads so far,
    from ``/proc/PID/task/*/schedstat`` ((0, 0) where the kernel keeps no schedstat). The wait is how
    much CPU the process wanted and did not get: on a machine shared with other jobs a planner that
    looks idle may be starved."""
    run = wait = 0
    for f in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            parts = f.read_text().split()
        except OSError:
            continue
        run, wait = run + int(parts[0]), wait + int(parts[1])
    return run / 1e9, wait / 1e9


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin(pid: int, cpus: list[int]) -> bool:
    """Pin ``pid`` to ``cpus``; False where the kernel refuses."""
    try:
        os.sched_setaffinity(pid, set(cpus))
        return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the planner's child before exec: SIGTERM when the run that started it dies, even by SIGKILL
    (Linux PR_SET_PDEATHSIG; elsewhere nothing): a killed run left its planner serving for ever."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Sample:
    t: float  # monotonic
    cpu: float  # CPU seconds so far
    rss: int
    wait: float = 0.0  # seconds its threads were runnable and waited for a CPU (schedstat)


@dataclass
class PlannerProcess:
    """A planner daemon in a temporary folder (removed by :meth:`stop`)."""

    extra_args: tuple[str, ...] = ()
    hold_seconds: float = 0.0
    max_agents: int = 10_000
    cprofile: str = ""  # write the planner's cProfile here (python -m pstats FILE)
    gc_pauses: str = ""  # write its gen-2 collection pauses here (runtime.measure.fleet.gcpauses)
    keep_log: str = ""  # copy its log (WARNING and above) here when it stops
    address: str = ""
    proc: subprocess.Popen[bytes] | None = None
    folder: str = ""
    samples: list[Sample] = field(default_factory=list)

    def start(self) -> str:
        """Start it and wait for its port file; returns HOST:PORT."""
        self.folder = tempfile.mkdtemp(prefix="edgesplit-fleet-")
        port_file = Path(self.folder, "port")
        prof = ["-m", "cProfile", "-o", self.cprofile] if self.cprofile else []
        entry = "runtime.measure.fleet.gcpauses" if self.gc_pauses else "runtime.cli.main"
        env = {**os.environ, gcpauses.OUT_ENV: self.gc_pauses} if self.gc_pauses else None
        cmd = [sys.executable, *prof, "-m", entry, "--log-level", "WARNING", "planner", "serve",
               "--listen", "127.0.0.1:0", "--db", str(Path(self.folder, "planner.sqlite")),
               "--port-file", str(port_file), "--hold-seconds", repr(self.hold_seconds),
               "--max-agents", str(self.max_agents), *self.extra_args]
        log = open(Path(self.folder, "planner.log"), "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env,
                                     start_new_session=True,  # Ctrl-C reaches us, and we stop it ourselves
                                     preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise Unavailable(f"the planner did not start (exit {self.proc.returncode}): {tail}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(port_file.read_text().strip())}"
        return self.address

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def sample(self) -> Sample:
        s = Sample(time.monotonic(), cpu_seconds(self.pid), rss_bytes(self.pid), sched_seconds(self.pid)[1])
        self.samples.append(s)
        return s

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return Path(self.folder, "planner.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (it drains), SIGKILL after ``grace`` s; then the folder goes."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            self.proc = proc  # keep pid/returncode readable
        if self.folder:
            if self.keep_log:
                with contextlib.suppress(OSError):
                    shutil.copyfile(Path(self.folder, "planner.log"), self.keep_log)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = ""
