"""Planner replicas for a fleet run (``--replicas N --store postgresql [--kill-after S]``).

N ``edgesplit planner serve`` processes on one PostgreSQL store (a throw-away server started for the
run with ``--store postgresql``, or the URL given), each with its own ``--replica-id``. Agents are
spread over them (agent i starts on replica i mod N) and follow a broken session to the next one,
as real agents behind a Kubernetes Service do (runtime.measure.fleet.agent). With ``--kill-after``
the first replica is SIGKILLed that long into the measured phase; the report then gives, for the
agents that were on it, the time from the kill to their registration's reply on a survivor (with
its plan: the planner decides at registration), and whether they kept their plan version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.measure.fleet.options import FleetOptions
from runtime.measure.fleet.planner_proc import PlannerProcess, pin
from runtime.measure.fleet.postgres import TempPostgres
from runtime.measure.fleet.stats import percentile

REATTACH_TARGET_SECONDS = 10.0  # issue 15: every agent of a killed replica re-attached and re-planned within this


@dataclass
class Replicas:
    """The planner processes of a run (one without replicas) and their store."""

    options: FleetOptions
    planners: list[PlannerProcess] = field(default_factory=list)
    server: TempPostgres | None = None
    store: str = ""  # the URL they share ("" without replicas: each its own SQLite file)
    killed_at: float | None = None  # monotonic time of the SIGKILL
    store_cpu_seconds: float | None = None  # the throw-away PostgreSQL server's CPU over the run (None: not ours)
    store_pinned: bool = False  # it ran on the planners' cores

    def pin_store(self, cpus: list[int]) -> bool:
        """Put the throw-away PostgreSQL server (its running processes; backends it forks later
        inherit it) on ``cpus``, the planners' cores: the loaders' core is theirs alone."""
        pids = self.server.pids() if self.server is not None and cpus else []
        self.store_pinned = bool(pids) and all(pin(pid, cpus) for pid in pids)
        return self.store_pinned

    def start(self) -> list[str]:
        o = self.options
        if o.gc_pauses or o.replicas > 1:
            Path(o.out_dir).mkdir(parents=True, exist_ok=True)
        extra: tuple[str, ...] = ()
        if o.store:
            if o.store == "postgresql":
                self.server = TempPostgres().start()
                self.store = self.server.new_database()
            else:
                self.store = o.store
            extra = ("--store", self.store)
        for k in range(o.replicas):
            ident = ("--replica-id", f"fleet-replica-{k}") if o.replicas > 1 else ()
            suffix = f"-{k}" if o.replicas > 1 else ""
            p = PlannerProcess((*o.planner_args, *extra, *ident), o.hold_seconds, max(10_000, o.agents),
                               cprofile=o.cprofile + suffix if o.cprofile else "",
                               gc_pauses=str(Path(o.out_dir, f"{o.name}_gc{suffix}.json")) if o.gc_pauses else "",
                               keep_log=str(Path(o.out_dir, f"{o.name}_planner{suffix}.log")) if o.replicas > 1 else "")
            self.planners.append(p)
            p.start()
        return [p.address for p in self.planners]

    @property
    def survivor(self) -> PlannerProcess:
        """The replica whose CPU and RSS the report gives (the last: never killed)."""
        return self.planners[-1]

    def alive(self) -> list[PlannerProcess]:
        return [p for p in self.planners if p.proc is not None and p.proc.poll() is None]

    def kill_first(self) -> None:
        p = self.planners[0]
        if p.proc is not None and p.proc.poll() is None:
            self.killed_at = time.monotonic()
            p.proc.kill()  # SIGKILL: no drain, no lease released

    async def kill_later(self, at: float, stop_health: asyncio.Event) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        stop_health.set()  # its health checks end first: a dead replica's refusals are not the survivor's latency
        self.kill_first()

    def stop(self) -> tuple[int | None, str]:
        """Stop every planner and the store's server; (an exit code of a planner that died by itself, its log tail)."""
        code, tail = None, ""
        for k, p in enumerate(self.planners):
            died = p.proc.poll() if p.proc is not None else None
            if died is not None and not (k == 0 and self.killed_at is not None) and code is None:
                code, tail = died, p.log_tail()
            p.stop()
        if self.server is not None:
            self.store_cpu_seconds = round(self.server.cpu_seconds(), 1)
            with contextlib.suppress(Exception):
                self.server.stop()
        return code, tail


def gc_pauses(p: PlannerProcess) -> dict[str, Any] | None:
    """What runtime.measure.fleet.gcpauses wrote at the planner's exit (None without --gc-pauses or when it
    wrote nothing: a killed replica)."""
    if not p.gc_pauses:
        return None
    try:
        d = json.loads(Path(p.gc_pauses).read_text())
    except (OSError, ValueError):
        return None
    g = d["gen2_ms"]
    return {"gen2": len(g), "gen2_max_ms": max(g, default=None), "gen2_p50_ms": percentile(g, 50),
            "gen2_ms": g, "young_over_20ms": d["young_over_20ms"], "frozen_objects": d["frozen"], "file": p.gc_pauses}


def summary(options: FleetOptions, st: dict[str, Any], killed_at: float | None,
            samples: list[list[dict[str, Any]]]) -> dict[str, Any] | None:
    """The replicas section of a run's results (None without replicas)."""
    if options.replicas < 2:
        return None
    out: dict[str, Any] = {"replicas": options.replicas, "store": "throw-away PostgreSQL" if options.store == "postgresql"
                           else "PostgreSQL", "killed": killed_at is not None,
                           "rss_mb": [round(max((s["rss"] for s in ss), default=0) / 2**20, 1) for ss in samples]}
    if killed_at is None:
        return out
    moved = [t for t in st["reattach_started"] if t >= killed_at]
    back = [(t - killed_at, before, after) for t, before, after in st["reattached"] if t >= killed_at]
    secs = [b[0] for b in back]
    out.update(kill_after_seconds=options.kill_after_seconds, moved=len(moved), reattached=len(back),
               kept_plan=sum(1 for _, before, after in back if before and after == before),
               p50_s=_s(percentile(secs, 50)), p99_s=_s(percentile(secs, 99)), max_s=_s(max(secs) if secs else None),
               within_target=sum(1 for s in secs if s <= REATTACH_TARGET_SECONDS),
               target_s=REATTACH_TARGET_SECONDS, profile_resent=st.get("profile_resent", 0),
               survivor_during_reattach=_window(samples[-1], killed_at, killed_at + max(secs, default=0.0)))
    failed: dict[str, list[float]] = {}
    for code, seconds in st.get("reattach_failed", []):
        failed.setdefault(code, []).append(seconds)
    if failed:  # failed re-registration attempts, by replica and code: how long each took
        out["reattach_failed"] = {c: {"n": len(v), "p50_s": _s(percentile(v, 50)), "max_s": _s(max(v))}
                                  for c, v in sorted(failed.items())}
    calls = [(sent - killed_at, done - sent) for sent, done in st.get("reattach_calls", []) if sent >= killed_at]
    if calls:  # where the time went: the loader's side (kill -> the call sent) and the survivor's (the call)
        sent_s, call_s = [c[0] for c in calls], [c[1] for c in calls]
        noticed = [t - killed_at for t in moved]  # the session's end seen (then the back-off, 0.25-0.75 s)
        out["reattach_split"] = {"noticed_p50_s": _s(percentile(noticed, 50)), "noticed_max_s": _s(max(noticed, default=0.0)),
                                 "sent_p50_s": _s(percentile(sent_s, 50)), "sent_max_s": _s(max(sent_s)),
                                 "call_p50_s": _s(percentile(call_s, 50)), "call_p99_s": _s(percentile(call_s, 99)),
                                 "call_max_s": _s(max(call_s))}
    return out


def _window(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, Any] | None:
    """The survivor's CPU and CPU wait (in cores) between the samples around ``start`` and ``end``:
    whether re-attaching was bound by its core."""
    inside = [s for s in samples if start - 0.5 <= s["t"] <= end + 0.5]
    if len(inside) < 2 or inside[-1]["t"] <= inside[0]["t"]:
        return None
    a, b = inside[0], inside[-1]
    wall = b["t"] - a["t"]
    return {"seconds": round(wall, 1), "cpu_cores": round((b["cpu"] - a["cpu"]) / wall, 3),
            "wait_cores": round((b["wait"] - a["wait"]) / wall, 3)}


def _s(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def markdown(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    line = f"- replicas: {r['replicas']} planners on one {r['store']} store, RSS {' / '.join(map(str, r['rss_mb']))} MB"
    if not r["killed"]:
        return [line]
    return [line, f"- replica killed (SIGKILL) {r['kill_after_seconds']:g} s into the measured phase: {r['moved']:,} agents "
                  f"lost their session, {r['reattached']:,} registered again on the survivor (re-attached and re-planned) "
                  f"p50 {r['p50_s']} s, p99 {r['p99_s']} s, max {r['max_s']} s after the kill; {r['within_target']:,} within "
                  f"{r['target_s']:g} s; {r['kept_plan']:,} kept their plan version; re-registered by profile hash, "
                  f"{r.get('profile_resent', 0):,} had to send the document"
                  + (f"; the survivor meanwhile ({w['seconds']} s): CPU {w['cpu_cores']} cores, waiting for a CPU "
                     f"{w['wait_cores']} cores' worth" if (w := r.get("survivor_during_reattach")) else "")
                  + (f"; kill -> the session's end noticed p50 {c['noticed_p50_s']} s, max {c['noticed_max_s']} s, -> the "
                     f"successful re-registration sent p50 {c['sent_p50_s']} s, max {c['sent_max_s']} s; that "
                     f"call p50 {c['call_p50_s']} s, p99 {c['call_p99_s']} s, max {c['call_max_s']} s"
                     if (c := r.get("reattach_split")) else "")]
