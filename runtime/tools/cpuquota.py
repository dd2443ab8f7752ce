"""CPU quotas for emulated slow machines: cgroup v1 ``cpu`` groups, created and always removed.

``CpuQuota(name, share)`` makes ``/sys/fs/cgroup/cpu/NAME`` with a 10 ms period (100 ms is jittery)
and a quota of ``share`` of one core; :meth:`add` moves a process into it. :meth:`remove` moves
what is left back to the root group and deletes the group; :class:`QuotaSet` removes every group it
made when its ``with`` block ends, also on an exception or Ctrl-C. Needs root and a cgroup v1
``cpu`` hierarchy: :func:`unavailable` says why not, or returns None.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 10_000
MIN_QUOTA_US = 1_000  # the kernel's smallest cfs quota


def unavailable(root: Path = ROOT) -> str | None:
    """Why CPU quotas cannot be used here (None: they can)."""
    if not (root / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu hierarchy at {root} (cgroup v2 only, or not mounted)"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (needs root)"
    return None


def _quota_us(share: float, period_us: int) -> int:
    """The quota of ``share`` cores per ``period_us`` (ValueError below the kernel's smallest quota)."""
    if round(share * period_us) < MIN_QUOTA_US:  # the kernel refuses a smaller quota
        raise ValueError(f"a share of {share:g} core is below the kernel's {MIN_QUOTA_US} us quota at a "
                         f"{period_us} us period; use a longer period")
    return round(share * period_us)


class CpuQuota:
    def __init__(self, name: str, share: float, root: Path = ROOT, period_us: int = PERIOD_US):
        if not 0.01 <= share <= 64:
            raise ValueError(f"a CPU share must be 0.01..64 cores, got {share}")
        quota = _quota_us(share, period_us)  # checked before the group is made
        self.path = root / name
        self.root = root
        self.share = share
        self.path.mkdir()
        self._write(period_us, quota)

    def set_period(self, period_us: int) -> None:
        """The same share in periods of ``period_us`` (a running group may switch between frames)."""
        self._write(period_us, _quota_us(self.share, period_us))

    def _write(self, period_us: int, quota_us: int) -> None:
        (self.path / "cpu.cfs_period_us").write_text(str(period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(quota_us))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def add_thread(self, tid: int) -> None:
        """Only this thread into the group (cgroup v1 ``tasks``); its process's other threads stay where they are."""
        (self.path / "tasks").write_text(str(tid))

    def remove(self) -> None:
        if not self.path.exists():
            return
        for _ in range(50):  # bounded: tasks may be exiting
            pids = [p for p in (self.path / "cgroup.procs").read_text().split() if p]
            for pid in pids:
                with contextlib.suppress(OSError):  # exited meanwhile
                    (self.root / "cgroup.procs").write_text(pid)
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)
        raise OSError(f"could not remove cgroup {self.path}")


class QuotaSet:
    """Groups named ``PREFIX-i``; all removed on exit."""

    def __init__(self, prefix: str, root: Path = ROOT):
        self.prefix, self.root = prefix, root
        self.groups: list[CpuQuota] = []

    def new(self, share: float, period_us: int = PERIOD_US) -> CpuQuota:
        q = CpuQuota(f"{self.prefix}-{len(self.groups)}", share, self.root, period_us)
        self.groups.append(q)
        return q

    def release(self, pid: int) -> None:
        """Every thread of ``pid`` back to the root group (unlimited); its group stays until the set's end."""
        (self.root / "cgroup.procs").write_text(str(pid))

    def __enter__(self) -> QuotaSet:
        return self

    def __exit__(self, *exc: object) -> None:
        errors = []
        for q in self.groups:
            try:
                q.remove()
            except OSError as e:
                errors.append(str(e))
        self.groups.clear()
        if errors:
            raise OSError("; ".join(errors))
