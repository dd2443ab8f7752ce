"""CPU quotas for emulated slow machines: cgroup v1 ``cpu`` groups, created and always removed. One copy for
``runtime.tools`` and ``runtime.measure``, which may not import each other (as :mod:`runtime.daemon.children`).

``CpuQuota(name, period_us, quota_us)`` makes ``/sys/fs/cgroup/cpu/NAME`` with that cfs period and quota
(a group whose files cannot be written is removed again); :meth:`CpuQuota.for_share` makes one from a share
of one core, at a 10 ms period by default (100 ms is jittery). :meth:`~CpuQuota.add` moves a process into it,
:meth:`~CpuQuota.add_thread` one thread. :meth:`~CpuQuota.remove` moves what is left back to the root group
and deletes the group, retrying a bounded number of times while its tasks exit. Needs root and a cgroup v1
``cpu`` hierarchy: :func:`unavailable` says why not, or returns None. ``runtime.tools.cpuquota.QuotaSet``
removes every group it made when its ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 10_000  # the default period of a group made from a share
MIN_QUOTA_US = 1_000  # the kernel's smallest cfs quota
REMOVE_TRIES = 50  # rmdir attempts while the group's tasks exit
REMOVE_WAIT_SECONDS = 0.1  # between two attempts (REMOVE_TRIES of them: 5 s at most)


def unavailable(root: Path = ROOT) -> str | None:
    """Why CPU quotas cannot be used here (None: they can)."""
    if not (root / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu hierarchy at {root} (cgroup v2 only, or not mounted)"
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (needs root)"
    return None


def share_quota_us(share: float, period_us: int) -> int:
    """The quota of ``share`` cores per ``period_us`` (ValueError below the kernel's smallest quota)."""
    if round(share * period_us) < MIN_QUOTA_US:  # the kernel refuses a smaller quota
        raise ValueError(f"a share of {share:g} core is below the kernel's {MIN_QUOTA_US} us quota at a "
                         f"{period_us} us period; use a longer period")
    return round(share * period_us)


class CpuQuota:
    """``ROOT/<name>`` with a cfs quota; processes join by writing their pid."""

    def __init__(self, name: str, period_us: int, quota_us: int, root: Path = ROOT):
        if quota_us < MIN_QUOTA_US:
            raise ValueError(f"cfs quota must be >= {MIN_QUOTA_US} us, got {quota_us}")
        self.path = root / name
        self.root = root
        self.share = quota_us / period_us  # cores; set_period keeps it
        self.path.mkdir()
        try:
            self._write(period_us, quota_us)
        except OSError:
            self.path.rmdir()
            raise

    @classmethod
    def for_share(cls, name: str, share: float, root: Path = ROOT, period_us: int = PERIOD_US) -> CpuQuota:
        """A group of ``share`` of one core (0.01..64) per ``period_us``; checked before the group is made."""
        if not 0.01 <= share <= 64:
            raise ValueError(f"a CPU share must be 0.01..64 cores, got {share}")
        q = cls(name, period_us, share_quota_us(share, period_us), root)
        q.share = share
        return q

    def set_period(self, period_us: int) -> None:
        """The same share in periods of ``period_us`` (a running group may switch between frames)."""
        self._write(period_us, share_quota_us(self.share, period_us))

    def _write(self, period_us: int, quota_us: int) -> None:
        (self.path / "cpu.cfs_period_us").write_text(str(period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(quota_us))

    def add(self, pid: int) -> None:
        """The process ``pid`` (every thread of it) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def add_thread(self, tid: int) -> None:
        """Only this thread into the group (cgroup v1 ``tasks``); its process's other threads stay where they are."""
        (self.path / "tasks").write_text(str(tid))

    @property
    def procs(self) -> list[int]:
        """The processes in the group now."""
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> bool:
        """Move any process left back to the root group, then remove the group (bounded retries: tasks may be
        exiting). True when the group is gone; False, with a warning, when it outlived the retries."""
        if not self.path.exists():
            return True
        for _ in range(REMOVE_TRIES):
            for pid in self.procs:
                with contextlib.suppress(OSError):  # exited meanwhile
                    (self.root / "cgroup.procs").write_text(str(pid))
            try:
                self.path.rmdir()
                return True
            except OSError:
                time.sleep(REMOVE_WAIT_SECONDS)
        logger.warning("could not remove %s", self.path)
        return False
