"""Sets of CPU quotas for the tools' emulated slow machines, always removed.

:class:`QuotaSet` makes groups named ``PREFIX-i`` (:class:`runtime.daemon.cgroup.CpuQuota`, each of a share
of one core) and removes every group it made when its ``with`` block ends, also on an exception or Ctrl-C.
The groups themselves, and :func:`runtime.daemon.cgroup.unavailable` (why quotas cannot be used here), are
runtime.daemon.cgroup's: the headline benchmark (runtime.measure) uses the same ones.
"""

from __future__ import annotations

from pathlib import Path

from runtime.daemon.cgroup import PERIOD_US, ROOT, CpuQuota


class QuotaSet:
    """Groups named ``PREFIX-i``; all removed on exit."""

    def __init__(self, prefix: str, root: Path = ROOT):
        self.prefix, self.root = prefix, root
        self.groups: list[CpuQuota] = []

    def new(self, share: float, period_us: int = PERIOD_US) -> CpuQuota:
        q = CpuQuota.for_share(f"{self.prefix}-{len(self.groups)}", share, self.root, period_us)
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
                if not q.remove():
                    errors.append(f"could not remove cgroup {q.path}")
            except OSError as e:
                errors.append(str(e))
        self.groups.clear()
        if errors:
            raise OSError("; ".join(errors))
