"""The runner: per model, profile the edge, start the board child (cgroup, calibration on the local passes,
device profile, JPEG frames), rank each peer's plan per scenario (the ranking is handed in by the CLI
layer: the runtime does not import the planner), start the worker, and per scenario a relay; then
every strategy on the same frames, local among them, in interleaved rounds. Everything it creates is
removed on exit, error and Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.contracts.costmodel import Configuration, Link
from runtime.contracts.profile import Profile
from runtime.contracts.profile import load as load_profile
from runtime.daemon.cgroup import CpuQuota, unavailable
from runtime.measure.scenarios import board as board_heads
from runtime.measure.scenarios import costs, dynamic, fidelity, trial
from runtime.measure.scenarios.device import _readline_json
from runtime.measure.scenarios.spec import JPEG_QUALITY, SCENARIOS, RunSpec, Scenario, round_edges
from runtime.measure.scenarios.testbed import Cleanup, Relay, measure_link

if TYPE_CHECKING:
    import torch

    from runtime.models.loader import LoadedModel
    from runtime.models.spec import ModelSpec

# (device profile, edge profile, link, min fidelity) -> the best configuration, or None
Ranker = Callable[[Profile, Profile, Link, float], "Configuration | None"]
# (model spec, n) -> (n frames [n, 3, H, W] for the fidelity checks, a description of them)
FrameMaker = Callable[["ModelSpec", int], "tuple[torch.Tensor, str]"]
# A JSON object: a job for the board child and its answer, a plan's job, a measured link, a result row. The values
# are read back from the child's stdout (json.loads: Any) and written to the results file as they are.
Json = dict[str, Any]
Progress = Callable[[str], None]
CHILD_START_SECONDS = 1800.0  # load, calibrate, profile and run local on the board
JOB_SECONDS = 1800.0  # one strategy's frames
# the stages kept per frame in the results (beside them the board's CPU for the frame, all its threads, and the quota's
# hold on it: cpu.stat's throttled time and throttled periods): where a frame's time went, e.g. a quota stall after
# the head that lands in the runtime's overhead, outside the floor. board_queue: the hand-off to the board thread;
# board_return: the way back from it to the loop (absent when the frame's board work ran on the loop's thread)
STAGE_KEYS = ("board_queue", "head", "tl_encode", "encode", "board_return", "transfer_edge", "edge_queue", "edge_decode",
              "edge_tail", "total")


def _plans(rank: Ranker, dev: Profile, edge: Profile, link: Link, spec: RunSpec, shapes: list[tuple[int, ...]],
           names: list[str], check: fidelity.Checker, tl_path: str) -> Json:
    """Each peer's plan by its own cost model; edgesplit's checked against its fidelity floor on the
    checker's frames first (:func:`fidelity.verified`)."""
    peers = {"scission": (costs.scission(dev), costs.scission(edge), 0.0),
             "scissionlite": (costs.scissionlite(dev, shapes), costs.scissionlite(edge, shapes), 0.0)}
    out: Json = {k: trial.job(rank(d, e, link, f), names) for k, (d, e, f) in peers.items()}
    conf, _, checks = fidelity.verified(rank, costs.edgesplit(dev, spec.codecs), costs.edgesplit(edge, spec.codecs),
                                        link, spec.min_fidelity, check, tl_path)
    out["edgesplit"] = trial.job(conf, names)
    out["edgesplit_checks"] = checks  # taken out before the jobs run (the plan may be local: no job)
    return out


def _offline_fidelity(check: fidelity.Checker, job: Json | None) -> Json:
    """A strategy's agreement on the checker's frames (1 for raw fp32 without a TL, and for local)."""
    if job is None or fidelity.exact(job["codec"], job["tl_id"]):
        value = 1.0
    else:
        value = check.agreement(job["split"], job["codec"], job.get("tl", "") if job["tl_id"] else "")
    return {"fidelity_offline": value, "fidelity_offline_frames": check.frames}


def _reference_tl(loaded: LoadedModel, split_name: str, out_dir: Path) -> str:
    from runtime.transfer.artifact import save_tl
    from runtime.transfer.layers import TransferLayer

    sp = next(p for p in loaded.sliced.split_points if p.name == split_name)
    _, path = save_tl(TransferLayer("reference", sp.out_shape), loaded, sp, out_dir)
    return str(path)


def _ask(child: subprocess.Popen[str], job: Json, timeout: float) -> Json:
    assert child.stdin is not None
    child.stdin.write(json.dumps(job) + "\n")
    child.stdin.flush()
    got = _readline_json(child, timeout)
    if "error" in got:
        raise RuntimeError(f"the board child failed {job.get('strategy')}: {got['error']}")
    return got


def _strategy_rows(name: str, got: Json, sc: Scenario, down: int, ref: list[int], job: Json | None) -> Json:
    rows = got["rows"]
    totals: list[float] = []
    floors: list[float] = []
    bytes_: list[float] = []
    top1: list[int] = []
    for r in rows:
        totals.append(r["times_ms"]["total"])
        floors.append(costs.floor_ms(r["times_ms"], r["wire_bytes"], down, sc.mbps, sc.rtt_ms))
        bytes_.append(r["wire_bytes"])
        top1.append(r["class_index"])
    out = costs.summarise(totals, floors, bytes_, top1, ref, job["predicted_ms"] if job else None)
    out.update(strategy=name, local_fallbacks=sum(r["where"] != "edge" for r in rows),
               plan=(job or {}).get("plan", ""), split=(job or {}).get("split", ""), codec=(job or {}).get("codec", ""),
               tl=(job or {}).get("tl_id", ""), per_frame_ms=totals, per_frame_floor_ms=floors,
               per_frame_stages_ms=[{k: round(v, 2) for k, v in r["times_ms"].items() if k in STAGE_KEYS}
                                    | {"throttled": round(r.get("throttled_ms", 0.0), 1),
                                       "throttled_periods": r.get("throttled_periods", 0),
                                       "board_cpu": round(r.get("board_cpu_ms", 0.0), 2)} for r in rows],
               bound_fps=costs.bound_fps(rows, statistics.median(bytes_), down, sc.mbps))
    if "pipelined" in got:
        out["pipelined"] = got["pipelined"]
    return out


def _edge_only_job(names: list[str], edge: Profile, sc: Scenario, jpeg: list[Json], down: int) -> Json:
    """The frame as a camera sends it: the wire's jpeg codec at split 'input' (the agent encodes on the
    board, the worker decodes on the edge), through the same relay as every other strategy."""
    mean_jpeg = statistics.mean(j["bytes"] for j in jpeg)
    predicted = (sum(b.seconds for b in edge.blocks) + sc.rtt_ms / 1e3 + (mean_jpeg + down) * 8 / (sc.mbps * 1e6)
                 + statistics.median(j["encode_ms"] for j in jpeg) / 1e3) * 1e3
    return {"split": names[0], "codec": "jpeg", "tl_id": "", "predicted_ms": predicted,
            "plan": f"JPEG q{JPEG_QUALITY} of the input (mean {mean_jpeg:,.0f} B), the wire's jpeg codec"}


def _board_encodes(measured: Profile, board: Json, local_p50_ms: float) -> tuple[Profile, float]:
    """The board's profile with the encode times it measured frame by frame; the rest scaled by local p50 / the block
    sum (the heads are priced after, :mod:`runtime.measure.scenarios.board`). Returns (profile, that factor)."""
    factor = local_p50_ms / 1e3 / sum(b.seconds for b in measured.blocks)
    dev = costs.rescale(measured, factor)
    # jpeg (at quality JPEG_QUALITY) at the input: the board's encode time as edge-only measures it, same frames
    dev = costs.with_input_encode(dev, statistics.median(j["encode_ms"] for j in board["jpeg"]) / 1e3)
    for c, frames in board.get("input_codecs", {}).items():  # pixels+lz4, webp: encode on the board, frame by frame
        dev = costs.with_codec_encode(dev, c, statistics.median(f["encode_ms"] for f in frames) / 1e3,
                                      round(statistics.median(f["bytes"] for f in frames)))
    return dev, factor


def _board_plans(model: str, rank: Ranker, dev: Profile, edge: Profile, spec: RunSpec,
                 points: tuple[list[tuple[int, ...]], list[str]], check: fidelity.Checker, tl_path: str,
                 child: subprocess.Popen[str], prefix: Json, local_p50_ms: float,
                 progress: Progress) -> tuple[Json, Profile, Json]:
    """Every strategy's plan per static scenario on the board's measured heads (the same profile for each):
    the prefix prior, each strategy's best few heads by it timed on the board, then each picked head timed on the
    board, planned again (:mod:`board`)."""
    shapes, names = points
    heads = board_heads.Heads(prefix["ms"], prefix["runs"], local_p50_ms)
    static = [s for s in spec.scenarios if not SCENARIOS[s].steps]
    links = [Link.from_mbps(SCENARIOS[s].rtt_ms, SCENARIOS[s].mbps) for s in static]

    def plan_all(d: Profile) -> Json:
        return {s: _plans(rank, d, edge, link, spec, shapes, names, check, tl_path) for s, link in zip(static, links, strict=True)}

    def first_picks(d: Profile) -> list[Json]:
        peers = {"scission": (costs.scission(d), costs.scission(edge), 0.0),
                 "scissionlite": (costs.scissionlite(d, shapes), costs.scissionlite(edge, shapes), 0.0),
                 "edgesplit": (costs.edgesplit(d, spec.codecs), costs.edgesplit(edge, spec.codecs), spec.min_fidelity)}
        return board_heads.top_heads(peers, links, spec.head_candidates, names, tl_path, heads)

    def time_on_board(todo: list[Json], budget_s: float | None = None) -> list[Json]:
        progress(f"{model}: timing {len(todo)} head(s) on the board, {spec.head_runs} frames each"
                 + (f", {budget_s:g} s at most" if budget_s is not None else "") + ": "
                 + ", ".join(f"{c['split']} ({', '.join(t['transfer'] for t in c['transfers'])})" for c in todo))
        timed: list[Json] = _ask(child, {"time_heads": todo, "runs": spec.head_runs, "budget_s": budget_s,
                                         "strategy": "board heads"}, JOB_SECONDS)["heads"]
        return timed

    plans, priced = board_heads.plan_with_board_heads(
        heads, dev, plan_all, time_on_board, names, tl_path,
        candidates=first_picks if spec.head_candidates > 0 else None, budget_s=spec.head_budget_s)
    return plans, priced, heads.summary()


def _checker(loaded: LoadedModel, spec: RunSpec, frames: FrameMaker, progress: Progress) -> fidelity.Checker:
    t = time.perf_counter()
    xs, what = frames(loaded.spec, spec.fidelity_frames)
    check = fidelity.Checker(loaded, xs, what)
    progress(f"{loaded.name}: fidelity reference on {check.frames} frames ({what}) in {time.perf_counter() - t:.0f} s")
    return check


def _start_board(model: str, spec: RunSpec, cg: CpuQuota, tmp: Path, cl: Cleanup, progress: Progress,
                 tls: list[str], jpeg_fidelity: bool) -> tuple[subprocess.Popen[str], Json, Profile]:
    """The board child: it loads the model, joins the cgroup, calibrates the quota, profiles and runs local.
    Returns (the child, what it reported, the board's profile as it measured it)."""
    profile_out = tmp / f"{model}-board.json"
    cfg = {"jpeg_fidelity": jpeg_fidelity, "model": model, "frames": spec.frames, "cgroup": str(cg.path),
           "testbed": {**asdict(spec.testbed), "first_quota_us": spec.testbed.start_quota_us},
           "profile_out": str(profile_out), "profile_runs": spec.profile_runs,
           "profile_inputs": spec.profile_inputs, "head_runs": spec.head_runs,
           "codecs": list(spec.codecs), "tls": tls, "jpeg_quality": JPEG_QUALITY, "jpeg_out": str(tmp / f"{model}-jpeg")}
    progress(f"{model}: board child: load, join the cgroup, calibrate the quota, profile, run local")
    child = subprocess.Popen([sys.executable, "-m", "runtime.measure.scenarios.device", json.dumps(cfg)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    cl.add(lambda: _kill(child))
    board = _readline_json(child, CHILD_START_SECONDS)
    cal = board["calibration"]
    progress(f"{model}: quota {cal['quota_us']}/{cal['period_us']} us -> the local run's slowdown {cal['slowdown']:.1f}x "
             f"({cal['free_ms']:.1f} -> {cal['device_ms']:.1f} ms; "
             + ", ".join(f"{r['kind']} {r['quota_us']} us {r['slowdown']:.1f}x" for r in cal["rounds"]) + ")")
    return child, board, load_profile(str(profile_out))


def _kill(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()


def _run_model(model: str, spec: RunSpec, rank: Ranker, cg: CpuQuota, links: dict[str, Json], tmp: Path, cl: Cleanup,
               progress: Progress, frames: FrameMaker) -> Json:
    import torch

    from runtime.measure.profiler import profile_model
    from runtime.models.loader import load_model
    from runtime.transfer.artifact import bundled_tl
    from runtime.worker.process import spawn_worker

    torch.set_num_threads(spec.testbed.threads)
    loaded = load_model(model)
    names = [p.name for p in loaded.sliced.split_points]
    shapes = [tuple(p.out_shape) for p in loaded.sliced.split_points]
    tl = bundled_tl(loaded.name)
    tls = [str(tl)] if tl else []
    tl_path = str(tl) if tl else ""
    progress(f"{model}: profiling the edge (unrestricted, {spec.testbed.threads} thread)")
    # JPEG fidelity on 4 photos in the profiles only for the dynamic trace's planner; static plans are checked here
    jpeg_fidelity = any(SCENARIOS[s].steps for s in spec.scenarios)
    edge = profile_model(loaded, "edge", machine="edge", runs=spec.profile_runs, warmup=1, codecs=spec.codecs,
                         tls=tls, threads=spec.testbed.threads, progress=False, inputs=spec.profile_inputs,
                         jpeg_fidelity=jpeg_fidelity)
    check = _checker(loaded, spec, frames, progress)
    child, board, measured = _start_board(model, spec, cg, tmp, cl, progress, tls, jpeg_fidelity)
    # the calibration's last local run (runtime.measure.scenarios.calibrate): the check on the quota, and the p50 the
    # heads are priced by; the local strategy's rows are timed again in each scenario's rounds (time_rounds)
    local_totals = [r["total_ms"] for r in board["local"]]
    cal = {**board["calibration"], "local_p50_ms": statistics.median(local_totals),
           "local_slowdown": statistics.median(local_totals) / board["calibration"]["free_ms"]}
    dev, factor = _board_encodes(measured, board, cal["local_p50_ms"])
    ref = [r["class_index"] for r in board["local"]]
    plans, dev, cal["board_heads"] = _board_plans(model, rank, dev, edge, spec, (shapes, names), check, tl_path, child,
                                                  board["prefix_heads"], cal["local_p50_ms"], progress)
    for p in plans.values():
        lite = p["scissionlite"]
        if lite and lite["tl_id"] == costs.REFERENCE_TL:
            lite["tl"] = _reference_tl(loaded, lite["split"], tmp / "tls")
            tls.append(lite["tl"])
        if p["edgesplit"] and p["edgesplit"]["tl_id"]:
            p["edgesplit"]["tl"] = str(tl)
    tried = _trial_candidates(rank, dev, edge, spec, names, check, tl_path, lambda what: progress(f"{model} {what}"))
    worker = spawn_worker(["--torch-threads", str(spec.testbed.threads), "--max-queue", "8",
                           *[a for t in dict.fromkeys(tls) for a in ("--tl", t)]])
    cl.add(worker.stop)
    down = loaded.sliced.split_points[-1].fp32_bytes if names else 0
    out: Json = {"calibration": {**cal, "profile_rescaled_by": factor, "local_in_rounds": True}, "local_ms": local_totals,
                 "scenarios": {}, "fidelity_frames": {"frames": check.frames, "what": check.describe}}
    for s in (s for s in spec.scenarios if not SCENARIOS[s].steps):
        sc = SCENARIOS[s]
        checks = plans[s].pop("edgesplit_checks")
        jobs = {**plans[s], "edge-only": _edge_only_job(names, edge, sc, board["jpeg"], down)}
        out["scenarios"][s] = _scenario(model, spec, child, worker.address, sc, links[s], jobs, cal, ref,
                                        sum(b.seconds for b in dev.blocks) * 1e3, down, cl, progress, check, tried[s])
        out["scenarios"][s]["edgesplit"]["fidelity_checks"] = checks
    progress(f"{model}: the local passes again, same quota (has the board drifted during the strategies?)")
    out["calibration"]["recheck"] = again = _ask(child, {"recheck": True, "strategy": "local recheck"}, JOB_SECONDS)["recheck"]
    progress(f"{model}: local again {again['device_ms']:.1f} ms = {again['slowdown']:.1f}x (the local run: "
             f"{cal['local_slowdown']:.1f}x)")
    _ask_quit(child)
    worker.stop()
    profiles = (tmp / f"{model}-device.json", tmp / f"{model}-edge.json")
    dev.save(profiles[0])
    edge.save(profiles[1])
    for s in (s for s in spec.scenarios if SCENARIOS[s].steps):
        progress(f"{model} {s}: dynamic trace (planner, worker and agent processes; runtime.tools.adapt_run)")
        out["scenarios"][s] = dynamic.trace(model, SCENARIOS[s], cal, spec, links, profiles, cl)
    return out


def _trial_candidates(rank: Ranker, dev: Profile, edge: Profile, spec: RunSpec, names: list[str],
                      check: fidelity.Checker, tl_path: str, progress: Progress) -> dict[str, tuple[list[Json], list[Json]]]:
    """Per static link, edgesplit's plans for its trial (:func:`trial.candidates`, on the board-priced profile) and
    the fidelity checks they needed; none when the trial is off."""
    out: dict[str, tuple[list[Json], list[Json]]] = {}
    for s in (s for s in spec.scenarios if not SCENARIOS[s].steps):
        sc = SCENARIOS[s]
        out[s] = trial.candidates(rank, costs.edgesplit(dev, spec.codecs), edge, Link.from_mbps(sc.rtt_ms, sc.mbps),
                                  spec.min_fidelity, check, tl_path, names, spec.plan_trial_margin,
                                  spec.plan_trial_plans) if spec.plan_trial_frames > 0 else ([], [])
        for j in out[s][0]:
            if j["tl_id"]:
                j["tl"] = tl_path
        progress(f"{s}: edgesplit's plans within {100 * spec.plan_trial_margin:g} % of its best: "
                 + (", ".join(f"{j['split']}:{j['transfer']} {j['predicted_ms']:.0f} ms" for j in out[s][0]) or "none"))
    return out


def _scenario(model: str, spec: RunSpec, child: subprocess.Popen[str], worker_address: str, sc: Scenario, link: Json,
              jobs: dict[str, Json | None], cal: Json, ref: list[int], local_predicted_ms: float, down: int, cl: Cleanup,
              progress: Progress, check: fidelity.Checker, tried: tuple[list[Json], list[Json]] = ([], [])) -> Json:
    """Every strategy on one static link (one relay to the worker), local among them in the rounds; before them,
    edgesplit's plan trial (:mod:`trial`) when it has candidates: edgesplit runs the plan measured fastest."""
    relay = Relay(worker_address, sc.rtt_ms / 2, sc.mbps)
    cl.add(relay.stop)
    rec: Json | None = None
    ask = lambda job: _ask(child, job, JOB_SECONDS)  # noqa: E731
    say = lambda what: progress(f"{model} {sc.name}: {what}")  # noqa: E731
    try:
        best = jobs.get("edgesplit")
        if tried[0] and best is not None:
            chosen, rec = trial.run(ask, [best, *tried[0][1:]], local_predicted_ms, relay.address,
                                    min(spec.plan_trial_frames, spec.frames), spec.warmup, spec.plan_trial_margin,
                                    spec.plan_trial_budget_s,
                                    lambda r: costs.floor_ms(r["times_ms"], r["wire_bytes"], down, sc.mbps, sc.rtt_ms),
                                    say)
            rec["checks"] = tried[1]
            jobs = {**jobs, "edgesplit": chosen}
        got, n = time_rounds(ask, spec, jobs, relay.address, say)
    finally:
        relay.stop()
    out = scenario_rows(got, jobs, sc, link, down, ref, cal, local_predicted_ms, check, n)
    if rec is not None:
        out["edgesplit"]["plan_trial"] = rec
    return out


def time_rounds(ask: Callable[[Json], Json], spec: RunSpec, jobs: dict[str, Json | None], address: str,
                progress: Progress) -> tuple[dict[str, Json], int]:
    """Each strategy's frames in ``spec.rounds`` rounds of consecutive frames, the strategies in turn, their order
    reversed each round: local (whole-model passes on the board, :meth:`device.Board.local`) is one of them, so it is
    timed on the same board as the rest when the host drifts. A job that is None (the plan keeps every block on the
    board) is not run: its row is local's. Returns (each run's rows, and pipelined pass where made; the rounds)."""
    runs: list[tuple[str, Json | None]] = [("local", None), *((n, j) for n, j in jobs.items() if j is not None)]
    got: dict[str, Json] = {name: {"rows": []} for name, _ in runs}
    edges = round_edges(spec.frames, spec.rounds)
    for k, (lo, hi) in enumerate(edges):
        last = k == len(edges) - 1
        for name, job in runs if k % 2 == 0 else runs[::-1]:
            step = f", round {k + 1} of {len(edges)}" if len(edges) > 1 else ""
            if job is None:  # local
                progress(f"local (whole-model passes on the board){step}")
                part = ask({"local": True, "strategy": "local", "warmup": spec.warmup, "frames_from": lo,
                            "frames_to": hi})
            else:
                progress(f"{name} ({job['plan']}){step}")
                part = ask({**job, "strategy": name, "address": address, "warmup": spec.warmup,
                            "frames_from": lo, "frames_to": hi, "window": spec.window if last else 1,
                            "pipeline_frames": (spec.pipeline_frames or spec.frames) if last else 0})
            got[name]["rows"].extend(part["rows"])
            if "pipelined" in part:
                got[name]["pipelined"] = part["pipelined"]
    return got, len(edges)


def local_row(rows: list[Json], ref: list[int], cal: Json, predicted_ms: float) -> Json:
    """The local strategy's row from its in-round passes; beside it the calibration's local run (timed once, before
    every strategy), both as slowdowns against the calibration's free time."""
    totals = [r["total_ms"] for r in rows]
    out = costs.summarise(totals, totals, [0] * len(rows), [r["class_index"] for r in rows], ref, predicted_ms)
    p50 = statistics.median(totals)
    out.update(strategy="local", per_frame_ms=totals, bound_fps=1e3 / p50, timed_in_rounds=True,
               slowdown=p50 / cal["free_ms"], free_ms=cal["free_ms"],
               calibration_p50_ms=cal["local_p50_ms"], calibration_slowdown=cal["local_slowdown"],
               per_frame_stages_ms=[{"total": round(r["total_ms"], 2), "throttled": round(r["throttled_ms"], 1),
                                     "throttled_periods": r["throttled_periods"],
                                     "board_cpu": round(r["board_cpu_ms"], 2)} for r in rows])
    return out


def scenario_rows(got: dict[str, Json], jobs: dict[str, Json | None], sc: Scenario, link: Json, down: int,
                  ref: list[int], cal: Json, local_predicted_ms: float, check: fidelity.Checker, n_rounds: int) -> Json:
    """The scenario's rows from :func:`time_rounds`' passes; a strategy whose plan keeps every block on the board
    (job None) gets local's row under its name."""
    res = {"local": {**local_row(got["local"]["rows"], ref, cal, local_predicted_ms), **_offline_fidelity(check, None)}}
    for name, job in jobs.items():
        if job is None:
            res[name] = dict(res["local"], strategy=name, plan="all blocks on the board")
        else:
            res[name] = {**_strategy_rows(name, got[name], sc, down, ref, job), **_offline_fidelity(check, job)}
    return {"link": link, **{k: res[k] for k in ("local", *jobs)}, "rounds": n_rounds}


def _ask_quit(child: subprocess.Popen[str]) -> None:
    if child.poll() is None and child.stdin is not None:
        child.stdin.write(json.dumps({"quit": True}) + "\n")
        child.stdin.flush()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run(spec: RunSpec, rank: Ranker, progress: Progress,
        partial: Callable[[Json], object] | None = None, frames: FrameMaker | None = None) -> Json:
    """Every model x scenario x strategy; the results as one JSON-able dict (``partial`` gets them
    after each model, so a long run that is stopped keeps what it measured). ``frames`` makes the fidelity
    checks' frames (default: the bundled photos, repeated)."""
    frames = frames or _sample_frames
    why = unavailable()
    if why:
        raise RuntimeError(f"cannot emulate the board: {why}; run as root on a host with cgroup v1 cpu")
    started, load = time.time(), _load()
    with Cleanup() as cl:
        tmp = Path(tempfile.mkdtemp(prefix="edgesplit-scenarios-"))
        cl.add(lambda: shutil.rmtree(tmp, ignore_errors=True))
        cg = CpuQuota(f"edgesplit-bench-{os.getpid()}", spec.testbed.period_us, spec.testbed.start_quota_us)
        cl.add(cg.remove)
        links: dict[str, Json] = {}
        for s in spec.scenarios:
            sc = SCENARIOS[s]
            for key, mbps in ([(s, sc.mbps)] if not sc.steps else [(f"{s}@{m:g}", m) for m, _ in sc.steps]):
                if key in links:
                    continue
                links[key] = measure_link(sc.rtt_ms / 2, mbps)
                progress(f"link {key}: set {mbps:g} Mbit/s {sc.rtt_ms:g} ms RTT; measured {links[key]['mbps']:.2f} "
                         f"Mbit/s {links[key]['rtt_ms']:.1f} ms"
                         + (f"  ** off by > 5 %: {', '.join(links[key]['off'])}" if links[key]["off"] else ""))
        models: dict[str, Json] = {}
        for m in spec.models:
            models[m] = _run_model(m, spec, rank, cg, links, tmp, cl, progress, frames)
            if partial is not None:
                partial(_result(spec, started, load, models))
    return _result(spec, started, load, models)


def _sample_frames(model_spec: ModelSpec, n: int) -> tuple[torch.Tensor, str]:
    """The bundled photos, repeated to ``n`` frames (four distinct images: the CLI hands in more)."""
    import torch

    from runtime.agent.sources import open_source

    return torch.cat([f.tensor for f in open_source(model_spec, "samples", n)]), f"the 4 bundled photos, {n} in turn"


def _load() -> str:
    """The load average over 1, 5 and 15 minutes, as ``uptime`` prints it."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _result(spec: RunSpec, started: float, load: str, models: dict[str, Json]) -> Json:
    return {"spec": asdict(spec), "started": started, "seconds": time.time() - started,
            "load": {"start": load, "end": _load()},
            "scenarios": {s: asdict(SCENARIOS[s]) for s in spec.scenarios}, "models": dict(models)}
