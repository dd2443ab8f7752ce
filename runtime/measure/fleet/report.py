"""Figures of a fleet run, and its JSON and markdown files."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from runtime.measure.fleet import replicas
from runtime.measure.fleet.options import FleetOptions
from runtime.measure.fleet.stats import percentile

TARGETS = {"step_to_push_p99_ms": 100.0, "health_p99_ms": 100.0, "register_10k_seconds": 60.0}


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1e3, 2)


def _cpu_share(samples: list[dict[str, Any]], a: float, b: float) -> float | None:
    """Cores the planner used on average from the last sample at or before monotonic time ``a`` to the
    first at or after ``b`` (samples every 0.5 s, so a short phase is widened by up to that)."""
    before = [s for s in samples if s["t"] <= a]
    after = [s for s in samples if s["t"] >= b]
    if not before or not after or after[0]["t"] <= before[-1]["t"]:
        return None
    x, y = before[-1], after[0]
    cores: float = (y["cpu"] - x["cpu"]) / (y["t"] - x["t"])
    return round(cores, 3)


def _wait_share(samples: list[dict[str, Any]], a: float, b: float) -> float | None:
    """Cores' worth of time the planner's threads waited for a CPU between ``a`` and ``b``."""
    before = [s for s in samples if s["t"] <= a]
    after = [s for s in samples if s["t"] >= b]
    if not before or not after or after[0]["t"] <= before[-1]["t"]:
        return None
    x, y = before[-1], after[0]
    cores: float = (y.get("wait", 0.0) - x.get("wait", 0.0)) / (y["t"] - x["t"])
    return round(cores, 3)


def _health(health: list[tuple[float, float]], a: float, b: float) -> dict[str, Any]:
    ok = [s for t, s in health if a <= t <= b and s >= 0]
    failed = sum(1 for t, s in health if a <= t <= b and s < 0)
    return {"checks": len(ok) + failed, "failed": failed, "p50_ms": _ms(percentile(ok, 50)),
            "p99_ms": _ms(percentile(ok, 99)), "max_ms": _ms(max(ok) if ok else None)}


def summarize(options: FleetOptions, raw: dict[str, Any]) -> dict[str, Any]:
    st, samples = raw["stats"], raw["samples"]
    reg_a, reg_b = st["first_register"], st["last_register"]
    reg_span = reg_b - reg_a if st["registered"] and reg_b > reg_a else None
    m_a, m_b = raw["measure_start"], raw["measure_end"]
    duration = m_b - m_a
    rss_end = max((s["rss"] for s in samples if s["t"] <= m_b), default=0)
    registered = st["registered"]
    lat = st["step_to_push"]
    lag = [x for t, x in st["loop_lag"] if m_a <= t <= m_b]  # the measured phase only
    loader_cpu = st["cpu_seconds"] + raw["driver_cpu_seconds"]  # loader processes + this one (health, samples)
    wall = m_b - raw["t_spawn"]
    return {
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.__dict__.items()},
        "command": options.command,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": raw["load_before"],
                    "load_after": raw["load_after"], "pinned": raw["pinned"], "planner_cpus": raw["planner_cpus"],
                    "loader_cpus": raw["loader_cpus"]},
        "registration": {"agents": options.agents, "registered": registered,
                         "seconds": None if reg_span is None else round(reg_span, 2),
                         "per_second": None if not reg_span else round(registered / reg_span, 1),
                         "call_p50_ms": _ms(percentile(st["register_seconds"], 50)),
                         "call_p99_ms": _ms(percentile(st["register_seconds"], 99)),
                         "planner_cpu_cores": _cpu_share(samples, reg_a, reg_b) if reg_span else None,
                         "planner_wait_cores": _wait_share(samples, reg_a, reg_b) if reg_span else None},
        "steady": {"seconds": round(duration, 1), "planner_cpu_cores": _cpu_share(samples, m_a, m_b),
                   "planner_wait_cores": _wait_share(samples, m_a, m_b),
                   "planner_rss_mb": round(rss_end / 2**20, 1),
                   "planner_rss_mb_before_agents": round(raw["baseline"]["rss"] / 2**20, 1),
                   "rss_kb_per_agent": round((rss_end - raw["baseline"]["rss"]) / 1024 / max(1, registered), 1)},
        "step_to_push": {"steps": st["steps"], "pushed": len(lat), "missed": st["steps_missed"],
                         "missed_by": dict(sorted(st["missed_by"].items())),
                         "p50_ms": _ms(percentile(lat, 50)), "p99_ms": _ms(percentile(lat, 99)),
                         "max_ms": _ms(max(lat) if lat else None),
                         "to_created_p50_ms": _ms(percentile(st["step_to_created"], 50)),
                         "to_created_p99_ms": _ms(percentile(st["step_to_created"], 99))},
        "health_all": _health(raw["health"], raw["t_spawn"], m_b),
        "health_steady": _health(raw["health"], m_a, m_b),
        "health_errors": raw["health_errors"],
        "telemetry": {"sent": st["telemetry_sent"], "acked": st["telemetry_acked"], "streams": st["telemetry_streams"],
                      "per_second": round(st["telemetry_sent"] / max(1e-9, wall), 1)},
        "plans_received": st["plans"], "watch_opens": st["watch_opens"],
        "errors": dict(sorted(st["errors"].items())),
        "error_details": dict(sorted(st.get("error_details", {}).items())),
        "retry_after": {"answers": st["retry_after"], "seconds_waited": round(st["retry_after_seconds"], 2)},
        "loader": {"processes": options.loader_count, "channels_each": options.channels,
                   "cpu_seconds": round(loader_cpu, 1), "cpu_cores": round(loader_cpu / max(1e-9, wall), 3),
                   "wait_seconds": round(st["wait_seconds"], 1),
                   "loop_lag_p50_ms": _ms(percentile(lag, 50)), "loop_lag_p99_ms": _ms(percentile(lag, 99)),
                   "driver_loop_lag_p99_ms": _ms(percentile([x for t, x in raw["driver_lag"] if m_a <= t <= m_b], 99))},
        "planner_gc": raw.get("gc"),
        "replicas": replicas.summary(options, st, raw.get("killed_at"), raw.get("replica_samples", [])),
        "store_server": {"cpu_seconds": raw.get("store_cpu_seconds"), "pinned_with_planners": raw.get("store_pinned")},
        "planner_exit": raw["planner_exit"], "planner_log_tail": raw["planner_log_tail"],
        "planner_pid": raw["planner_pid"], "planner_folder": raw["planner_folder"],
    }


def markdown(r: dict[str, Any]) -> str:
    o, reg, sd, sp, h = r["options"], r["registration"], r["steady"], r["step_to_push"], r["health_all"]
    hs, t, ld, m = r["health_steady"], r["telemetry"], r["loader"], r["machine"]
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
    lines = [
        f"### {o['agents']:,} agents, telemetry heartbeat {o['telemetry_interval_seconds']:g} s",
        "",
        f"`{r['command']}`" if r["command"] else "",
        "",
        f"- registration: {reg['registered']:,}/{reg['agents']:,} agents in {reg['seconds']} s "
        f"({reg['per_second']}/s); RegisterAgent p50 {reg['call_p50_ms']} ms, p99 {reg['call_p99_ms']} ms; "
        f"planner CPU {reg['planner_cpu_cores']} cores (waiting for a CPU {reg['planner_wait_cores']})",
        f"- step-to-push (bandwidth step reported -> new plan at that agent): p50 {sp['p50_ms']} ms, "
        f"p99 {sp['p99_ms']} ms, max {sp['max_ms']} ms; {sp['pushed']} of {sp['steps']} steps pushed, {sp['missed']} missed"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sp['missed_by'].items())})" if sp["missed_by"] else "")
        + f"; to the plan's created_unix (stamped as the planner builds it, before its fallback table, store write and "
        f"push; no loader lag): p50 {sp['to_created_p50_ms']} ms, "
        f"p99 {sp['to_created_p99_ms']} ms",
        f"- health: p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, max {h['max_ms']} ms over {h['checks']} checks "
        f"({h['failed']} failed); measured phase only: p50 {hs['p50_ms']} ms, p99 {hs['p99_ms']} ms",
        f"- planner in the measured phase ({sd['seconds']} s): CPU {sd['planner_cpu_cores']} cores (runnable but "
        f"waiting for a CPU: {sd['planner_wait_cores']} cores' worth), RSS "
        f"{sd['planner_rss_mb']} MB ({sd['planner_rss_mb_before_agents']} MB before agents, "
        f"{sd['rss_kb_per_agent']} KB per agent)",
        f"- telemetry: {t['sent']:,} sent ({t['per_second']}/s over the run), {t['acked']:,} acked on "
        f"{t['streams']:,} streams; plans received {r['plans_received']:,}; WatchPlan opened {r['watch_opens']:,} times",
        f"- errors by RPC and code: {errors}; retry-after answers {r['retry_after']['answers']} "
        f"({r['retry_after']['seconds_waited']} s waited)",
        f"- loader: {ld['processes']} process(es) x {ld['channels_each']} channels, {ld['cpu_seconds']} CPU s with the driver "
        f"({ld['cpu_cores']} cores; {ld['wait_seconds']} s waiting for a CPU), counted apart from the planner; event-loop "
        f"lag in the measured phase p50 {ld['loop_lag_p50_ms']} ms, p99 {ld['loop_lag_p99_ms']} ms (driver p99 {ld['driver_loop_lag_p99_ms']} ms); "
        f"pinned: {m['pinned']} (planner cpus {m['planner_cpus']}, loader cpus {m['loader_cpus']})",
        f"- load average before {_load(m['load_before'])}, after {_load(m['load_after'])} (machine shared with other jobs)",
        *replicas.markdown(r.get("replicas")),
        *_gc_lines(r.get("planner_gc")),
    ]
    if r["planner_exit"] is not None:
        lines.append(f"- the planner exited during the run with code {r['planner_exit']}")
    return "\n".join(lines) + "\n"


def _gc_lines(g: dict[str, Any] | None) -> list[str]:
    if not g:
        return []
    return [f"- planner garbage collections of the oldest generation (--gc-pauses): {g['gen2']}, p50 {g['gen2_p50_ms']} ms, "
            f"max {g['gen2_max_ms']} ms; young ones over 20 ms: {len(g['young_over_20ms'])}; {g['frozen_objects']:,} objects "
            f"frozen at exit ({g['file']})"]


def _load(v: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in v)


def write(result: dict[str, Any], out_dir: str, name: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    return paths


def table(runs: list[dict[str, Any]]) -> str:
    """One markdown table row per run (several runs of ``edgesplit bench-planner-fleet``) and the targets."""
    head = ("| agents | heartbeat s | registration | step-to-push p50 / p99 ms | steps pushed / made (missed) | "
            "planner side p50 / p99 ms | health p50 / p99 ms (measured phase) | planner CPU / waiting (cores) | "
            "planner RSS MB | telemetry sent / acked | errors | loader CPU (cores) / loop lag p99 ms | load avg before |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in runs:
        reg, sp, hs, sd, t, ld = (r["registration"], r["step_to_push"], r["health_steady"], r["steady"],
                                  r["telemetry"], r["loader"])
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        rows.append(f"| {reg['agents']:,} | {r['options']['telemetry_interval_seconds']:g} | {reg['seconds']} s "
                    f"({reg['per_second']}/s) | {sp['p50_ms']} / {sp['p99_ms']} | {sp['pushed']} / {sp['steps']} "
                    f"({sp['missed']}) | {sp.get('to_created_p50_ms')} / {sp.get('to_created_p99_ms')} | "
                    f"{hs['p50_ms']} / {hs['p99_ms']} | {sd['planner_cpu_cores']} / {sd.get('planner_wait_cores')} | "
                    f"{sd['planner_rss_mb']} | {t['sent']:,} / {t['acked']:,} | {errors} | {ld['cpu_cores']} / "
                    f"{ld.get('loop_lag_p99_ms')} | {_load(r['machine']['load_before'])} |")
    return "\n".join(rows) + "\n"


def targets(r: dict[str, Any]) -> str:
    """Issue 15's targets against one run (p99 step-to-push and health in the measured phase, registration)."""
    sp, hs, reg = r["step_to_push"], r["health_steady"], r["registration"]
    def met(ok: bool | None) -> str:
        return "met" if ok else "not met" if ok is not None else "not measured"
    p99, hp99, secs = sp["p99_ms"], hs["p99_ms"], reg["seconds"]
    return (f"{reg['agents']:,} agents: step-to-push p99 {p99} ms <= {TARGETS['step_to_push_p99_ms']:g} ms: "
            f"{met(None if p99 is None else p99 <= TARGETS['step_to_push_p99_ms'])}; health p99 {hp99} ms < "
            f"{TARGETS['health_p99_ms']:g} ms: {met(None if hp99 is None else hp99 < TARGETS['health_p99_ms'])}; "
            f"registration of {reg['registered']:,} in {secs} s (< {TARGETS['register_10k_seconds']:g} s for 10,000): "
            + (met(None if secs is None else secs < TARGETS['register_10k_seconds'] and reg['registered'] == reg['agents'])
               if reg["agents"] >= 10_000 else "the target is for 10,000"))


if __name__ == "__main__":  # python -m runtime.measure.fleet.report RUN.json ...: the table and the targets
    import sys

    loaded = [json.loads(Path(p).read_text()) for p in sys.argv[1:]]
    print(table(loaded))
    for run in loaded:
        print("- " + targets(run))
