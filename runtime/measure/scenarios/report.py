"""Results as JSON, a markdown table and PNG plots (latency by strategy per scenario; bytes)."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Any

from runtime.measure.scenarios import calibrate as calibration
from runtime.measure.scenarios.spec import STRATEGIES

FAITHFUL = 0.99  # "at most one point of fidelity lost": top-1 agreement with the unsplit model


def machine() -> str:
    import os

    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}"


def _static_table(model: str, s: str, r: dict[str, Any]) -> list[str]:
    es = r["edgesplit"]
    best_any = min(STRATEGIES, key=lambda k: r[k]["floor_p50_ms"])
    best = _best_faithful_floor(r)
    lines = [f"### {model}, {s}\n",
             "| strategy | plan | p50 ms | p95 ms | bytes/frame | fidelity (run) | fidelity (N frames) | predicted ms | "
             "floor ms | overhead ms (% of floor) | frames/s pipelined (bound) | fallbacks |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in STRATEGIES:
        x = r[k]
        pred = f"{x['predicted_ms']:.1f}" if x.get("predicted_ms") is not None else "-"
        pipe = x.get("pipelined")
        fps = (f"{pipe['fps']:.2f} ({x['bound_fps']:.2f})" if pipe else
               f"- ({x['bound_fps']:.2f})" if x.get("bound_fps") else "-")
        lines.append(f"| {k} | {x.get('plan', '') or 'whole model on the board'} | {x['p50_ms']:.1f} | {x['p95_ms']:.1f} | "
                     f"{x['bytes_per_frame']:,.0f} | {x['fidelity']:.3f} | {_offline(x)} | {pred} | {x['floor_p50_ms']:.1f} | "
                     f"{x['overhead_p50_ms']:.1f} ({x['overhead_pct']:.1f} %) | {fps} | {x.get('local_fallbacks', 0)} |")
    if r.get("rounds", 1) > 1:
        lines.append(f"\nThe strategies' timed frames ran in {r['rounds']} rounds of consecutive frames, the strategies in "
                     + ("turn, local's whole-model passes on the board among them, "
                        if r["local"].get("timed_in_rounds") else "turn, ")
                     + "their order reversed each round (warm-up frames in each; the pipelined pass in the last).")
    lines.append(_local_timing(r["local"]))
    checks = (es.get("fidelity_checks") or [])
    if checks:
        lines.append("\nedgesplit's fidelity checks before it ran (floor: a plan below it is struck, the planner asked "
                     "again; a JPEG below it bounds the other qualities, the highest measured too): "
                     + "; ".join(f"{c['transfer']} at {c['split']} {c['fidelity']:.3f} on {c['frames']}"
                                 + {True: " (kept)", False: " (struck)"}.get(c.get("kept"), " (bound)") for c in checks))
    if es.get("plan_trial"):
        lines.append("\n" + _trial(es["plan_trial"], r["local"]["p50_ms"]))
    fastest = min(STRATEGIES, key=lambda k: r[k]["p50_ms"])
    faithful = [k for k in STRATEGIES if r[k].get("fidelity_offline", r[k]["fidelity"]) >= FAITHFUL]
    within = min(faithful, key=lambda k: r[k]["p50_ms"]) if faithful else "none"
    if within in ("local", "scission") and not es.get("split") and r[within]["p50_ms"] == es["p50_ms"]:
        within += " = edgesplit (the same plan: every block on the board)"
    lines.append(f"\nfastest: **{fastest}**; fastest within one point of the unsplit model (fidelity on N frames >= "
                 f"{FAITHFUL:g}): **{within}**; local / edgesplit = **{r['local']['p50_ms'] / es['p50_ms']:.2f}x**; "
                 f"Scission / edgesplit = **{r['scission']['p50_ms'] / es['p50_ms']:.2f}x**; the largest ratio the "
                 f"measured floors allow within one point: local / the best such floor ({best}) = "
                 f"{r['local']['p50_ms'] / r[best]['floor_p50_ms']:.2f}x (edgesplit reaches "
                 f"**{100 * r[best]['floor_p50_ms'] / es['p50_ms']:.0f} %** of it); at any fidelity: local / "
                 f"{best_any}'s floor = {r['local']['p50_ms'] / r[best_any]['floor_p50_ms']:.2f}x "
                 f"({100 * r[best_any]['floor_p50_ms'] / es['p50_ms']:.0f} %); "
                 f"edgesplit measured / its own floor = {es['p50_ms'] / es['floor_p50_ms']:.3f}{_per_frame(es)}.\n")
    return lines


def _trial(rec: dict[str, Any], local_p50_ms: float) -> str:
    """edgesplit's plan trial (runtime.measure.scenarios.trial): what was trialled, measured and chosen; when local
    won, the split plans' lowest floor it measured beside local's in-round p50."""
    if not rec.get("ran"):
        return f"edgesplit's plan trial: not run ({rec.get('why', '')})."
    splits = [c["floor_p50_ms"] for c in rec["candidates"] if not c["local"]]
    low, won_local = (min(splits) if splits else 0.0), rec["chosen"] == "local"
    parts = "; ".join(f"{c['plan'] if not c['local'] else 'local (every block on the board)'}: predicted "
                      f"{c['predicted_ms']:.0f} ms, measured p50 {c['p50_ms']:.1f} (floor {c['floor_p50_ms']:.1f}, "
                      f"board CPU {c['board_cpu_p50_ms']:.1f} ms a frame)" for c in rec["candidates"])
    skipped = "; ".join(f"{s['plan']} ({s['why']})" for s in rec.get("skipped", []))
    return (f"edgesplit's plan trial before the rounds ({rec['frames']} frames each through the agent, worker and "
            f"relay, local as whole-model passes, {rec.get('rounds', 2)} rounds; plans within "
            f"{100 * rec['margin']:.0f} % of the best's prediction, {rec['budget_s']:g} s budget; {rec.get('seconds', 0):.0f} s): {parts}"
            + (f"; not run: {skipped}" if skipped else "") + f". Chosen: **{rec['chosen']}**, {rec['why']}."
            + (f" edgesplit runs every block on the board (the planner may choose all-local): its row is local's. "
               f"Against the lowest floor of a split plan in the trial ({low:.1f} ms), local's in-round p50 would allow "
               f"{local_p50_ms / low:.2f}x; edgesplit's 1.00x is {100 * low / local_p50_ms:.0f} % of it."
               if won_local and low else ""))


def _local_timing(x: dict[str, Any]) -> str:
    """Where the local row's frames were timed: in the rounds, the calibration's local run beside it (both against the
    calibration's free time), or (older results) the calibration's local run alone, before every strategy."""
    if not x.get("timed_in_rounds"):
        return ("\nlocal: its passes timed once, before every strategy (this run predates local in the rounds: the "
                "board may have drifted between them and the others).")
    return (f"\nlocal: timed in the rounds, p50 {x['p50_ms']:.1f} ms = **{x['slowdown']:.1f}x** the calibration's free "
            f"time ({x['free_ms']:.1f} ms); the calibration's local run (before every strategy, the quota's check): "
            f"p50 {x['calibration_p50_ms']:.1f} ms = {x['calibration_slowdown']:.1f}x.")


def _per_frame(x: dict[str, Any]) -> str:
    """The median over frames of measured / that frame's floor: the board's quota stalls (one 50 ms period) land in
    the timed compute or in the runtime's own board work, so the medians of the two columns can be frames apart;
    and how many frames had more than 20 ms above their floor (a stall in the runtime's board work); and the board's
    CPU per frame (its process, every thread), to set beside the quota's budget per period."""
    tot, flo = x.get("per_frame_ms"), x.get("per_frame_floor_ms")
    if not tot or not flo:
        return ""
    stalled = sum(t - f > 20.0 for t, f in zip(tot, flo, strict=True))
    cpu = [st["board_cpu"] for st in x.get("per_frame_stages_ms", []) if "board_cpu" in st]
    return (f" (median per frame {statistics.median(t / f for t, f in zip(tot, flo, strict=True)):.3f}"
            + (f"; {stalled} of {len(tot)} frames over 20 ms above their floor" if "per_frame_stages_ms" in x else "")
            + (f"; the board's CPU per frame, all its threads: median {statistics.median(cpu):.1f} ms, max "
               f"{max(cpu):.1f}" if cpu else "")
            + ")")


def _fidelity(x: dict[str, Any]) -> float:
    return float(x.get("fidelity_offline", x["fidelity"]))


def _best_faithful_floor(r: dict[str, Any]) -> str:
    """The strategy with the lowest measured floor among those within one point of the unsplit model (local is)."""
    return min((k for k in STRATEGIES if _fidelity(r[k]) >= FAITHFUL), key=lambda k: r[k]["floor_p50_ms"])


def _heads(c: dict[str, Any]) -> str:
    """How the board's heads were priced (runs since the board-heads calibration; older results say nothing)."""
    h = c.get("board_heads")
    if not h:
        return ""
    timed = "; ".join(f"{t['split']} ({t['transfer']}{', candidate' if t.get('why') == 'candidate' else ''}) head "
                      f"{t['head_ms']:.1f} ms against {t['prior_ms']:.1f} ms in whole passes, encode "
                      f"{t['encode_ms']:.1f} ms, {t['frames']} frames" for t in h["timed"])
    skipped = ", ".join(t["split"] for t in h.get("skipped", []))
    how = ("each strategy's best heads by that prior (candidate) and then each head a strategy picked, timed on its "
           "own on the board after one quota period idle per frame, and the plans made again"
           if any("why" in t for t in h["timed"]) else
           "each head a strategy picked, timed on its own on the board and the plans made again")
    return (f" Heads, the same for every strategy: the time to each cut in {h['prefix_runs']} whole passes under the "
            f"quota (median per cut), scaled by {h['prefix_scaled_by']:.2f} to the local p50; then {how}: "
            f"{timed or 'none past the input'}" + (f"; candidates left untimed (time budget): {skipped}" if skipped else "")
            + ".")


def _board(c: dict[str, Any], spec: dict[str, Any]) -> str:
    """The board's quota and slowdown: calibrated on the local run itself (runtime.measure.scenarios.calibrate), the
    same passes again after the strategies (older results: the calibration's passes and the local run after
    profiling). The warnings are :func:`calibration.warnings`, each on its own line after the paragraph."""
    head = f"Board: cgroup v1 quota {c['quota_us']} us per {c['period_us']} us period, 1 torch thread"
    if c.get("target") is None:
        return (f"{head}: full model {c['device_ms']:.1f} ms against {c['free_ms']:.1f} ms unrestricted = "
                f"**{c['slowdown']:.1f}x slower** (target {spec['testbed']['target_slowdown']:g}x), measured in this run"
                + (f"; the local run (same quota, right after profiling): p50 {c['local_p50_ms']:.1f} ms = "
                   f"**{c['local_slowdown']:.1f}x**" if "local_p50_ms" in c else "") + ".")
    rounds = ", ".join(f"{r['kind']} ({r['passes']} passes) {r['quota_us']} us {r['slowdown']:.1f}x" for r in c["rounds"])
    again = c.get("recheck")
    text = (f"{head}, calibrated on the local run itself: the local run ({len(c['local_ms'])} whole-model passes back "
            "to back after the profile, "
            + ("the frames every strategy runs; the local rows below are timed again in each scenario's rounds"
               if c.get("local_in_rounds") else "the frames every strategy runs")
            + f") p50 {c['device_ms']:.1f} ms against {c['free_ms']:.1f} ms "
            f"unrestricted (median of {c['free_passes']} passes) = **{c['slowdown']:.1f}x slower** (target "
            f"{c['target']:g}x, tolerance {100 * c['tolerance']:.0f} %), measured in this run; the coarse calibration "
            + (f"{c['coarse_slowdown']:.1f}x" if c.get("coarse_slowdown") is not None else "not run")
            + f"; rounds (quota -> slowdown): {rounds}"
            + (f"; the same passes again after the strategies, same quota: p50 {again['device_ms']:.1f} ms = "
               f"**{again['slowdown']:.1f}x** ({again['slowdown_free_now']:.1f}x against {again['free_now_ms']:.1f} ms "
               "unrestricted timed then)" if again else "") + ".")
    return text


def _offline(x: dict[str, Any]) -> str:
    v = x.get("fidelity_offline")
    return "-" if v is None else f"{v:.3f} ({x['fidelity_offline_frames']})"


def _dynamic(model: str, s: str, r: dict[str, Any]) -> list[str]:
    steps = " -> ".join(f"{m:g} Mbit/s for {t:g} s" for m, t in r["steps"])
    lines = [f"### {model}, {s} (dynamic trace)\n",
             f"Steps: {steps}, {r['rtt_ms']:g} ms RTT; board at {r['board_share']:.4f} of a core "
             f"({r['board_period_us']} us period, the share calibrated above). Command: `{r['command']}`; timeline "
             f"![{s}]({r['files'][2]}) ({r['files'][1]}).\n",
             f"Frames {r['frames']}: lost {r['lost']}, duplicated {r['duplicated']}, past their deadline "
             f"{r['past_deadline']} (ran on the board instead), fallbacks {r['fallbacks']}.\n",
             "| step | Mbit/s | plan (split) | frames ran as (split:codec, where) | first frame under the new plan s "
             "(started / result) | "
             "frames | switches / 40 s steady | median \\|predicted - measured\\| |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for ph in r["phases"]:
        first = ph.get("first_frame_under_new_plan_s")
        if first is not None and ph.get("first_frame_started_under_new_plan_s") is not None:
            first = f"{ph['first_frame_started_under_new_plan_s']} / {first}"  # adapt_run: its arrival, its result
        ran = ", ".join(f"{k} x{v}" for k, v in ph.get("ran", {}).items()) or "-"
        lines.append(f"| {ph.get('step') or 'start'} | {ph['mbps']:g} | {ph.get('plan', '-')} | {ran} | "
                     f"{'-' if first is None else first} | {ph['frames']} | {ph.get('switches_per_40s_steady', '-')} | "
                     f"{ph.get('median_rel_error', '-')} |")
    for k, lk in r["links"].items():
        lines.append(f"\n- link {k}: set {lk['set_mbps']:g} Mbit/s, {lk['set_rtt_ms']:g} ms RTT; measured {lk['mbps']:.2f} "
                     f"Mbit/s, {lk['rtt_ms']:.1f} ms" + (f" (**> 5 % off: {', '.join(lk['off'])}**)" if lk["off"] else ""))
    return [*lines, ""]


def markdown(res: dict[str, Any]) -> str:
    spec = res["spec"]
    load = res.get("load", {})
    lines = ["# edgesplit bench-scenarios\n", f"Command: `{spec['command']}`  ", f"Machine: {res['machine']}  ",
             (f"Load average (uptime, 1/5/15 min) at the start {load.get('start', '?')}, at the end {load.get('end', '?')}: "
              if not res.get("merged_runs") else f"{res['merged_runs']} runs (each model's command and "
              "load average under its heading): ") + "the machine was shared with other jobs.  ",
             f"Frames per strategy: {spec['frames']} one at a time, then {spec['pipeline_frames'] or spec['frames']} with "
             f"{spec['window']} in flight (bundled photos, the same frames for every strategy), {spec['warmup']} "
             f"warm-up; run took {res['seconds']:.0f} s.\n"]
    for s, link in next(iter(res["models"].values()))["scenarios"].items():
        if link.get("dynamic"):
            continue
        lk = link["link"]
        lines.append(f"- link {s}: set {lk['set_mbps']:g} Mbit/s, {lk['set_rtt_ms']:g} ms RTT; measured {lk['mbps']:.2f} Mbit/s, "
                     f"{lk['rtt_ms']:.1f} ms" + (f" (**> 5 % off: {', '.join(lk['off'])}**)" if lk["off"] else " (within 5 %)"))
    for model, m in res["models"].items():
        c = m["calibration"]
        lines.append(f"\n## {model}\n\n{_board(c, spec)} "
                     f"The board's block profile (measured under the quota) was scaled by {c.get('profile_rescaled_by', 1):.2f} "
                     + ("to the local run's p50" if "local_p50_ms" in c else "to that full-model time")
                     + (" (per-block medians miss the throttling)." if not c.get("board_heads") else
                        " for the codec encodes not timed on their own.") + _heads(c)
                     + (f" Fidelity (N frames): {m['fidelity_frames']['what']}." if m.get("fidelity_frames") else "")
                     + (f" This model's run: `{m['command']}`, load average {m['load']}." if m.get("command") else "")
                     + "\n" + "".join(f"\n- **board: {w}**\n" for w in calibration.warnings(c, spec["testbed"])))
        for s, r in m["scenarios"].items():
            lines.extend(_dynamic(model, s, r) if r.get("dynamic") else _static_table(model, s, r))
    lines.append("floor = compute (board: head, TL encoder, codec encode, e.g. the JPEG; edge: decode, tail) + (bytes up + "
                 "result bytes down) / set bandwidth + set RTT; overhead = measured - floor (medians per frame): what "
                 "the runtime adds (threads, gRPC, queues). Fidelity (run) = top-1 agreement with the unsplit model on the "
                 "board, same frames (the bundled photos in turn); fidelity (N frames) = the same agreement of the "
                 "strategy's split, codec and TL on N other frames (named per model), computed off the board (raw "
                 "fp32 without a TL, and local, are exact: 1). Edge-only: the wire's jpeg codec at split 'input' (the agent encodes on the board, "
                 "the worker decodes on the edge), through the same relay. frames/s pipelined: the pipelined pass "
                 "(frames in flight as above); bound = 1 / the slowest stage (board compute, edge compute, uplink, "
                 "downlink; medians); local has no pipeline (one board core). ScissionLite's reference TL "
                 "pool/up-sample time is not in its cost model. "
                 "ScissionLite reports up to 16x over local on its testbed; here no strategy can beat local by more than "
                 "local / the best measured floor, set by the board/edge compute ratio above and the link.")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(m, s, r) for m, mm in res["models"].items() for s, r in mm["scenarios"].items() if not r.get("dynamic")]
    if not rows:
        return
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 2.2 * len(rows)), 7))
    width = 0.8 / len(STRATEGIES)
    for i, k in enumerate(STRATEGIES):
        xs = [j + i * width for j in range(len(rows))]
        axes[0].bar(xs, [r[k]["p50_ms"] for _, _, r in rows], width, label=k,
                    yerr=[[0] * len(rows), [r[k]["p95_ms"] - r[k]["p50_ms"] for _, _, r in rows]])
        axes[0].scatter(xs, [r[k]["floor_p50_ms"] for _, _, r in rows], marker="_", color="k", s=80)
        axes[1].bar(xs, [max(1.0, r[k]["bytes_per_frame"]) for _, _, r in rows], width, label=k)
    for ax, title in ((axes[0], "latency p50 ms (bar to p95; black tick: physical floor)"), (axes[1], "bytes/frame (log)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [f"{m}\n{s}" for m, s, _ in rows], fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one model each (or more) as one result: every model keeps its own command, load average and
    seconds; the links are each run's own measurement (the first run's shown at the top). A model in several
    runs (e.g. its scenarios split over two runs) appears once per run, the later ones as "MODEL (run N)",
    each with its own board calibration."""
    if not parts:
        raise ValueError("nothing to merge")
    models: dict[str, Any] = {}
    for i, r in enumerate(parts):
        for name, m in r["models"].items():
            key = name if name not in models else f"{name} (run {i + 1})"
            models[key] = {**m, "command": r["spec"]["command"], "machine": r.get("machine", ""),
                            "load": f"{r['load']['start']} at the start, {r['load']['end']} at the end",
                            "seconds": r["seconds"]}
    first = parts[0]
    spec = {**first["spec"], "command": "; ".join(f"`{r['spec']['command']}`" for r in parts).strip("`"),
            "models": list(models)}
    loads = [r["load"] for r in parts]
    return {**first, "spec": spec, "models": models, "seconds": sum(r["seconds"] for r in parts),
            "load": {"start": loads[0]["start"], "end": loads[-1]["end"]}, "merged_runs": len(parts)}


def write(res: dict[str, Any], out_dir: str, stem: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(res, indent=1) + "\n")
    paths[1].write_text(markdown(res))
    try:
        plot(res, paths[2])
    except ImportError:  # matplotlib is optional: pip install 'edgesplit[bench]'
        return paths[:2]
    return [p for p in paths if p.exists()]
