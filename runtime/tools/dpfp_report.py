"""dpfp_bench's report: OUT.md from the run's result (strategies' rows, per-block breakdown, where each
block's time goes, throughput) and the machine it ran on (issue 13).

    python -m runtime.tools.dpfp_report RESULT.json [--out RESULT.md]

writes a recorded result's report again (to standard output by default), older records included (see :func:`load`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from runtime.tools import dpfp_timeline
from runtime.tools.dpfp_measure import ACKED, HALO

OLD_DEFAULTS = {"link_mode": "shared", "relays": "inline", "event_loop": "asyncio", "malloc": "defaults"}
"""What a record made before a field existed ran with: dpfp_bench's --link-mode default and the only mode before it
(one shared link costed), relays in the coordinator's process (before --relays), and the coordinator on asyncio's
loop with glibc's allocator defaults (before it ran on runtime.wire.eventloop.run)."""


def load(path: Path) -> dict[str, Any]:
    """A dpfp_bench result file, with what older records lack filled in as they ran: ``args.link_mode`` and
    ``args.relays`` and the coordinator's loop and allocator from :data:`OLD_DEFAULTS`, and a row without its
    ``stage`` (recorded before rows kept it) given one from its blocks and predicted time (no halo, no grids)."""
    res: dict[str, Any] = json.loads(path.read_text())
    if not isinstance(res, dict) or not isinstance(res.get("rows"), list) or not isinstance(res.get("args"), dict):
        raise ValueError(f"{path}: not a dpfp_bench result (no rows and args)")
    for key in ("link_mode", "relays"):
        res["args"].setdefault(key, OLD_DEFAULTS[key])
    for key in ("event_loop", "malloc"):
        res.setdefault(key, OLD_DEFAULTS[key])
    for r in res["rows"]:
        if "stage" not in r:
            r["stage"] = {"predicted_seconds": r["predicted_seconds"],
                          "blocks": [{"start": a, "end": b} for a, b in r["blocks"]]}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.dpfp_report", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("result", help="a dpfp_bench result (OUT.json)")
    p.add_argument("--out", default="", help="write the report here instead of standard output")
    args = p.parse_args(argv)
    try:
        text = markdown(load(Path(args.result)))
    except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        print(f"dpfp_report: cannot read {args.result}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__}


_LABEL = {HALO: " (halo)", ACKED: " (halo, acked)"}
_RELAYS = {"process": "a process each", "inline": "in the coordinator process",
           "none": "NOT USED in this run (--relays none: straight to the workers; the link figures are only what the planner assumed)"}


def _fmt(v: object, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _blocks(r: dict[str, Any]) -> str:
    grids, halo = r.get("grid_cols") or [1] * len(r["blocks"]), sum(b.get("halo_input", 0) for b in r["stage"]["blocks"])
    return (f"{len(r['blocks'])}" + (f" ({sum(1 for c in grids if c > 1)} grids)" if any(c > 1 for c in grids) else "")
            + (f", {halo} by halo exchange" if halo else ""))


def _faults(r: dict[str, Any]) -> str:
    """Failed tile attempts (timed frames) and, over every frame the coordinator ran, the halo frames that
    resumed with gather and scatter and their tiles fetched back / computed again."""
    if r.get("measured_seconds") is None:
        return "-"
    rec = r.get("halo_recovered_tiles") or {}
    return (f"{r.get('tile_failures', 0)}; {r.get('halo_fallbacks', 0)}: {rec.get('fetched', 0)} / "
            f"{rec.get('recomputed', 0)}")


def _breakdown(res: dict[str, Any]) -> list[str]:
    """Per fused block of each DPFP row: predicted and measured seconds, tiling."""
    out = ["", "Per fused block (DPFP rows; measured: median time from the previous block's last tile in (or the frame's start) to this block's last tile in; with the wavefront a block's tiles start before the previous block ends, so this may be less than its tiles take):", "",
           "| K | block | tiling | predicted s | measured s | slowest tile's compute s (worker-reported) |",
           "|---|---|---|---:|---:|---:|"]
    for r in res["rows"]:
        if r["strategy"] not in ("dpfp", HALO, ACKED) or not r.get("measured_block_seconds"):
            continue
        grids = r.get("grid_cols") or [1] * len(r["blocks"])
        slow = r.get("slowest_tile_compute_seconds") or [None] * len(r["blocks"])
        for (a, b), c, p, m, w, h in zip(r["blocks"], grids, r["predicted_block_seconds"], r["measured_block_seconds"],
                                         slow, [b.get("halo_input", False) for b in r["stage"]["blocks"]], strict=True):
            tiling = (f"{r['workers_used'] // c}x{c} grid" if c > 1 else "row bands") + (", halo in" if h else "")
            out.append(f"| {r.get('label', r['workers'])}{_LABEL.get(r['strategy'], '')} | {a}..{b} | {tiling} | {p:.3f} | "
                       f"{m:.3f} | {_fmt(w, '.3f')} |")
    return out


def _throughput(res: dict[str, Any]) -> list[str]:
    rows = [r for r in res["rows"] if r.get("window_period_seconds")]
    if not rows:
        return []
    bases = {r.get("period_us"): r["window_period_seconds"] for r in rows if r["workers"] == 1 and r["strategy"] == "single_worker"}
    out = ["", f"Throughput with {res['args']['window']} frames in flight through the stage (seconds per frame = wall "
           f"time of {res['args']['frames'] * res['args']['window']} frames / their number; against the single worker "
           "with K=1 measured the same way). This is time per frame, not latency:", "",
           "| K | strategy | s per frame | reduction | speedup |", "|---|---|---:|---:|---:|"]
    for r in rows:
        p, base = r["window_period_seconds"], bases.get(r.get("period_us"))
        red = f"{100 * (1 - p / base):.1f}%" if base else "-"
        spd = f"{base / p:.2f}x" if base else "-"
        out.append(f"| {r.get('label', r['workers'])} | {r['strategy']} | {p:.3f} | {red} | {spd} |")
    return out


def _factors_note(res: dict[str, Any]) -> str:
    tf = res.get("tile_factors")
    if not tf:
        return "each tile priced by its area share of the untiled block (no tile-compute factors)"
    return (f"each tile's area share times the unit's factor at that share, measured on real tiles by "
            f"runtime.tools.dpfp_tilecal ({len(tf['units'])} units, median of {tf['runs']} runs per tile shape, "
            f"{tf['threads']} thread, at {tf['measured_at']}"
            f"{', inside a worker quota' if not res['args'].get('tile_factors') else ', file ' + res['args']['tile_factors']})")


def _label(res: dict[str, Any]) -> None:
    """Each row's K label: with several quota periods, "K @ P ms"."""
    many = len(res["args"].get("periods") or [0]) > 1
    for r in res["rows"]:
        r["label"] = f"{r['workers']}" + (f" @ {r.get('period_us', 10_000) / 1000:g} ms" if many else "")


def _quota(a: dict[str, Any]) -> str:
    periods = a.get("periods") or [a.get("period_us", 10_000)]
    return (" / ".join(f"cfs_quota {round(a['share'] * p)} us per {p:,} us" for p in periods)
            + ("; the workers' groups switched between frames, profile and tile factors at the first" if len(periods) > 1
               else ""))


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    _label(res)
    single: dict[tuple[int, int | None], float | None] = {
        (r["workers"], r.get("period_us")): r.get("measured_seconds") for r in res["rows"] if r["strategy"] == "single_worker"}

    def base_of(p: int | None) -> float | None:
        return single.get((1, p)) or next((v for (_, q), v in single.items() if q == p), None)
    base_pred = next((r["predicted_seconds"] for r in res["rows"] if r["strategy"] == "single_worker"), None)
    cal = res.get("coordinator", {})
    coord = (f"the coordinator's per-byte rate, measured before planning by runtime.agent.parallel_calibrate over "
             f"{', '.join(cal['blocks'])}: {cal['bytes_per_second'] / 1e6:.1f} MB/s + "
             f"{cal.get('block_overhead_seconds', 0.0) * 1e3:.2f} ms per block (in the cost model)"
             if cal.get("bytes_per_second") else "the coordinator's per-byte work not costed")
    out = [f"# DPFP benchmark: {a['model']} {res['range'][0]}..{res['range'][1]}", "",
           f"Command: `{res['command']}`", "",
           f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, kernel {res['machine']['kernel']}, "
           f"Python {res['machine']['python']}, torch {res['machine']['torch']}; shared with other jobs: "
           + ("load average not recorded." if not res.get("load_before") else "load average "
           f"{' / '.join(f'{x:.2f}' for x in res.get('load_before', []))} (1/5/15 min) before the run, "
           f"{' / '.join(f'{x:.2f}' for x in res.get('load_after', []))} after.") + " Coordinator on "
           f"{res.get('event_loop', OLD_DEFAULTS['event_loop'])}'s event loop, glibc's allocator "
           f"{'tuned (tune_malloc)' if res.get('malloc') == 'tuned' else 'at its defaults'} (the workers' daemons "
           "tune it from 75bc352 on).", "",
           f"Each worker: its own cgroup v1 CPU quota of {a['share']:g} core ({_quota(a)}), one torch thread; the coordinator (stitching, encoding) and the relays run outside the "
           f"quotas. Link: one user-space relay per worker "
           f"({_RELAYS.get(a.get('relays', 'inline'), '')}), {a['delay_ms']:g} ms one way, {a['rate_mbps']:g} Mbit/s "
           f"each direction (planned with --link-mode {a['link_mode']}; codec {a.get('codec', 'raw')}; "
           f"{'row bands only' if a.get('no_grids') else 'row bands or 2-D grids'}; {coord}; coordinator "
           f"{'waits for each whole block' if a.get('barrier') else 'wavefront: a tile goes once the tiles it reads are in'}). Times: the stage "
           f"alone, median of {a['frames']} frames after one warm-up "
           f"({'one strategy after the other' if a.get('sequential') else 'interleaved: frame i of every strategy in turn'}); "
           "reduction and speedup against the single worker "
           "measured with K=1, and against the single worker measured in the same K group (the same minutes of "
           "machine load); predicted: against the predicted single worker.", "",
           f"Tile compute: {_factors_note(res)}.", "",
           "Faults: failed tile attempts in the timed frames; halo frames that resumed with gather and scatter: "
           "their tiles fetched back from the workers keeping them / computed again (runtime.agent.parallel_recover; "
           "over every frame run, warm-up and throughput frames included).", "",
           "| K | strategy | predicted s | measured s | pred. error | reduction (meas.) | speedup (meas.) | vs single "
           "worker, same K | reduction (pred.) | max rel. error | fused blocks | faults: failed tiles; fallbacks: fetched / recomputed |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in res["rows"]:
        m, base = r.get("measured_seconds"), base_of(r.get("period_us"))
        red = f"{100 * (1 - m / base):.1f}%" if m and base else "-"
        spd = f"{base / m:.2f}x" if m and base else "-"
        same = single.get((r["workers"], r.get("period_us")))
        same_k = f"{100 * (1 - m / same):.1f}% / {same / m:.2f}x" if m and same else "-"
        perr = f"{100 * (r['predicted_seconds'] / m - 1):+.0f}%" if m else "-"
        out.append(f"| {r['label']} | {r['strategy']} | {r['predicted_seconds']:.3f} | "
                   f"{_fmt(m, '.3f') if m else 'skipped: ' + r['skipped']} | "
                   f"{perr} | {red} | {spd} | {same_k} | "
                   f"{_fmt(100 * (1 - r['predicted_seconds'] / base_pred) if base_pred else None, '.1f')}% | "
                   f"{_fmt(r.get('max_rel_error'), '.1e')} | "
                   f"{_blocks(r)} | {_faults(r)} |")
    return "\n".join(out + _breakdown(res) + dpfp_timeline.markdown(res["rows"]) + _throughput(res)) + "\n"


if __name__ == "__main__":
    sys.exit(main())
