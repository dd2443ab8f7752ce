"""The device agent's own CPU per frame: what the runtime costs the board beside the model and the codec (issue 14).

    python -m runtime.measure.agent_cpu --model mobilenet_v2 --split input --codec webp --frames 40
    python -m runtime.measure.agent_cpu --model resnet18 --split layer2_1_relu_1 --codec int8+lz4

A real worker runs as a child process on loopback (unrestricted); the agent runs in this process on the
event loop ``edgesplit agent`` uses (uvloop where installed, runtime.wire.eventloop), with one frame in flight
and ``--gap-ms`` idle between frames (a camera's spacing). Each thread's CPU time comes from the kernel
(``/proc/self/task/TID/schedstat``, nanoseconds of run time), read before and after each round of frames, so
reading it costs nothing per frame. Threads are grouped as the board thread (head, TL encoder, codec encode, the
message), the event loop thread (send, receive, result handling, telemetry, metrics, logging), gRPC's C-core
threads, and the rest. A lone frame's board work runs on the event loop's thread once its plan's board time is known
to be short, or once the hand-offs back from the board thread are measured to stall (under ``--quota-us`` they do;
runtime.agent.boardplace): then it is counted in the loop's figure, not the board's, and a run may mix the two. So
the tool also reports board + loop (``thread_board_loop``, ``runtime_board_loop``), the figure that compares across
runs whichever thread the board work ran on; the runtime's own figure is the process's less the compute.

The head, TL encoder and codec encode are then timed on their own, on the board thread, with the same inputs
(``time.thread_time``: CPU, not wall). The runtime's own CPU per frame is the process's CPU per frame less those,
and less the background: the CPU the agent burns with its stream open and no frame (timers, keep-alive pings,
the in-flight watcher), measured for ``--idle-s`` seconds and counted for the frames' wall time. Idle, the stream's
liveness probes an idle peer every ``probe_after`` (0.5 s, runtime.wire.liveness); frames answered sooner than that
never let those probes run, so the background counted then is a second window with the stream's idle probes paused
(the idle window's full rate, probes included, made the runtime figure ~0.2 ms a frame too low at 50 ms gaps).

``--quota-us`` runs the agent under a cgroup v1 CPU quota (the headline benchmark's, runtime.daemon.cgroup; the worker stays free), joined
after the model is loaded, as the headline benchmark's board does; it reports the group's throttled time per
frame. Without root or a cgroup v1 cpu hierarchy it says why and stops (exit 2). Figures go to stdout; ``--json``
writes them all; ``--markdown`` also prints them as a markdown table row (FIGURES' columns).
runtime/measure/results/agent_cpu.md records the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.run import choose_split
from runtime.agent.sources import open_source
from runtime.measure.scenarios.device import quota_held
from runtime.models.loader import load_model
from runtime.wire import eventloop
from runtime.wire.codec import get_codec

MAX_FRAMES = 10_000  # frames per round at most (bounded loops)
MAX_ROUNDS = 100
MAX_GAP_MS = 5_000.0
GROUPS = ("board", "loop", "grpc", "other")

# The per-frame figures (ms, the median over rounds of each round's figure / its frames): JSON key, what it is.
# A key added later is missing from older result files (runtime/measure/results/agent_cpu.json): with_combined()
# fills it from the parts, so those files read the same.
FIGURES = (
    ("wall", "wall time per frame, the gap between frames included"),
    ("process", "the process's CPU (every thread, ended ones too)"),
    ("thread_board_loop", "board + loop threads' CPU: the agent's own threads, wherever a frame's board work ran"),
    ("thread_board", "the board thread's CPU (head, TL encoder, codec encode, when handed to it)"),
    ("thread_loop", "the event loop thread's CPU (send, receive, results, telemetry; a lone frame's board work too)"),
    ("thread_grpc", "gRPC's own threads' CPU (C-core, grpc.aio's poller)"),
    ("thread_other", "every other thread's CPU"),
    ("throttled", "time the CPU quota held the process (0 without --quota-us)"),
    ("compute_alone", "head + TL encoder + codec encode, timed alone on the board thread"),
    ("compute_in_frames", "head + TL encoder + codec encode as they ran in the frames (the board job's own CPU)"),
    ("background", "the idle background's CPU rate times the frame's wall time"),
    ("runtime", "the runtime's own CPU: process - compute_alone - background"),
    ("runtime_beside", "the runtime's CPU beside the frames' own compute: process - compute_in_frames - background"),
    ("runtime_board_loop", "thread_board_loop - compute_alone - the board and loop threads' background"),
    ("runtime_board", "thread_board - compute_alone - its background (negative when the board work ran on the loop)"),
    ("runtime_loop", "thread_loop - its background (includes the board work that ran on the loop)"),
    ("runtime_grpc", "thread_grpc - its background"),
)


def thread_cpu() -> dict[int, tuple[str, int]]:
    """Every thread of this process: tid -> (name, CPU ns so far). Python threads by their Python name, the others
    by the kernel's (gRPC core names its own)."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out: dict[int, tuple[str, int]] = {}
    for task in Path("/proc/self/task").iterdir():
        tid = int(task.name)
        try:
            ns = int((task / "schedstat").read_text().split()[0])
            comm = (task / "comm").read_text().strip()
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
        out[tid] = (names.get(tid, comm), ns)
    return out


def group_of(tid: int, name: str, loop_tid: int) -> str:
    """Which of GROUPS a thread belongs to."""
    if tid == loop_tid:
        return "loop"
    if name.startswith("board"):
        return "board"
    if name.startswith(("grpc", "event_engine", "lifeguard", "default-execu", "timer_manager")) or "_poll_wrapper" in name:
        return "grpc"  # gRPC core's own threads, and grpc.aio's completion-queue poller (a Python thread)
    return "other"


def cpu_delta(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], loop_tid: int) -> dict[str, float]:
    """CPU seconds per group between two :func:`thread_cpu` readings (a thread born meanwhile counts from 0;
    one that ended meanwhile is lost, which the process total below shows)."""
    out = dict.fromkeys(GROUPS, 0.0)
    for tid, (name, ns) in after.items():
        out[group_of(tid, name, loop_tid)] += (ns - before.get(tid, (name, 0))[1]) / 1e9
    return out


def read_threads() -> tuple[dict[int, tuple[str, int]], float]:
    """:func:`thread_cpu` and the CPU seconds the reading itself took on the calling thread (the event loop's:
    ~0.35 ms with ten threads, 2026-12-05). A window between two readings holds the process's CPU for both and,
    on the loop thread, about one reading's (the part of the first after the loop's own line, the part of the
    second before it): :func:`_untool` takes them off, or a 1 s idle window counted ~0.7 ms/s of the tool's own
    /proc reads as the agent's background."""
    t0 = time.thread_time()
    cpu = thread_cpu()
    return cpu, time.thread_time() - t0


def _untool(cpu: dict[str, float], proc: float, own_s: float) -> tuple[dict[str, float], float]:
    """A window's CPU per group and process CPU less the tool's own readings (``own_s``: both readings' cost)."""
    return {**cpu, "loop": max(0.0, cpu["loop"] - own_s / 2)}, max(0.0, proc - own_s)


def process_cpu() -> float:
    """This process's CPU seconds so far (every thread, ended ones included; CLOCK_PROCESS_CPUTIME_ID, ns)."""
    return time.process_time()


def throttled_ms(cgroup: Path | None) -> float:
    """The cgroup's time held by its quota so far, ms (0 without one; the board's reading in bench-scenarios)."""
    return quota_held(str(cgroup) if cgroup is not None else "")[0]


def compute_alone(agent: Agent, xs: list[torch.Tensor], runs: int, gap_s: float = 0.0) -> dict[str, float]:
    """Median CPU ms per frame of the head, the TL encoder and the codec encode, each on its own, on the board
    thread (where the agent runs them), with the agent's inputs; one untimed pass first. Each pass starts after
    ``gap_s`` idle, as a frame's does (the board waits for the worker between frames): back to back, with warm
    caches, MobileNetV2's webp encode took 2.15 ms a frame, 2.45 ms after 20 ms idle (2026-12-04), which
    would have been counted as the runtime's."""
    plan = agent.active

    def job() -> dict[str, list[float]]:
        got: dict[str, list[float]] = {"head": [], "tl_encode": [], "encode": []}
        for r in range(runs + 1):
            time.sleep(gap_s)
            x = xs[r % len(xs)]
            t0 = time.thread_time()
            with torch.inference_mode():
                h = plan.head(x)
                t1 = time.thread_time()
                z = plan.encoder(h) if plan.encoder is not None else h
            t2 = time.thread_time()
            plan.codec.encode_frame(z)
            t3 = time.thread_time()
            if r:
                got["head"].append(t1 - t0)
                got["tl_encode"].append(t2 - t1)
                got["encode"].append(t3 - t2)
        return got

    got = agent.executor.submit(job).result()
    return {k: statistics.median(v) * 1e3 for k, v in got.items()}


def time_board_jobs(agent: Agent) -> list[float]:
    """Have ``agent`` append each frame's board job CPU (head, TL encoder, codec encode, as ``Agent._head_encode``
    runs them in the frame, on whichever thread: ``time.thread_time``) to the list returned. Against
    :func:`compute_alone` it tells the model's own CPU in the frames (cold caches after the worker, the loop and,
    under a quota, every throttled period) from the runtime's beside it (2026-12-05: MobileNetV2's head at
    features_7_conv_3 under 1.32 ms / 20 ms took 0.3-1.5 ms more in the frames than alone). Two clock reads a
    frame, on the board job's thread."""
    got: list[float] = []
    head_encode = agent._head_encode

    def timed(plan, x):  # Agent._head_encode's own arguments
        t0 = time.thread_time()
        try:
            return head_encode(plan, x)
        finally:
            got.append(time.thread_time() - t0)

    agent._head_encode = timed  # type: ignore[method-assign]  # this tool's own agent: the frames call it by name
    return got


def probes_sent(agent: Agent) -> dict[str, int]:
    """The active stream's liveness probes sent so far, by kind (runtime.wire.stream ``probes_sent``: on the stream,
    Health/Check on the frames' connection, on the path; "held": of the first two, those sent while a frame held
    the stream with nothing outstanding, i.e. its head computing); {} for a stream that does not count them."""
    stream = agent.active.stream
    return dict(getattr(stream, "probes_sent", {})) if stream is not None else {}


def _probes_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


async def _round(agent: Agent, xs: list[torch.Tensor], frames: int, gap_s: float, loop_tid: int,
                 cgroup: Path | None, board_cpu: list[float] | None = None) -> dict:
    """``frames`` frames one at a time, ``gap_s`` apart: CPU per group, wall, throttled time and stage medians;
    with ``board_cpu`` (each frame's board job CPU seconds, appended by :func:`time_board_jobs`) their sum too."""
    results = []
    probes0 = probes_sent(agent)
    n0 = len(board_cpu) if board_cpu is not None else 0
    # the process's window holds the threads' readings (~0.35 ms of CPU each, once a round): taken off (_untool)
    thr0, proc0 = throttled_ms(cgroup), process_cpu()
    cpu0, own0 = read_threads()
    wall0 = time.perf_counter()
    for i in range(frames):
        results.append(await agent.infer(xs[i % len(xs)], frame=str(i)))
        if gap_s > 0:
            await asyncio.sleep(gap_s)
    wall = time.perf_counter() - wall0
    cpu1, own1 = read_threads()
    cpu, proc = _untool(cpu_delta(cpu0, cpu1, loop_tid), process_cpu() - proc0, own0 + own1)
    probes = _probes_delta(probes0, probes_sent(agent))
    local = [r for r in results if r.where != "edge"]
    if local:
        raise RuntimeError(f"{len(local)} of {frames} frames ran locally: {sorted({r.fallback_reason for r in local})}")
    stages = sorted({k for r in results for k in r.times})
    board = {"compute_in_frames_s": sum(board_cpu[n0:])} if board_cpu is not None else {}
    return {"frames": frames, "wall_s": wall, "process_s": proc, "threads_s": cpu, **board,
            "throttled_ms": throttled_ms(cgroup) - thr0, "probes": probes,
            "stage_p50_ms": {k: statistics.median(r.times.get(k, 0.0) for r in results) * 1e3 for k in stages},
            "wire_bytes_p50": statistics.median(r.wire_bytes for r in results)}


async def _idle(seconds: float, loop_tid: int, agent: Agent | None = None) -> dict:
    """The agent's CPU with its stream open and no frame for ``seconds``: per group, seconds per second (and the
    liveness probes sent meanwhile, by kind)."""
    probes0 = probes_sent(agent) if agent is not None else {}
    proc0 = process_cpu()
    cpu0, own0 = read_threads()
    wall0 = time.perf_counter()
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - wall0
    cpu1, own1 = read_threads()
    cpu, proc = _untool(cpu_delta(cpu0, cpu1, loop_tid), process_cpu() - proc0, own0 + own1)
    probes = _probes_delta(probes0, probes_sent(agent)) if agent is not None else {}
    return {"wall_s": wall, "process_per_s": proc / wall, "threads_per_s": {k: v / wall for k, v in cpu.items()},
            "probes": probes}


async def _background(agent: Agent, seconds: float, loop_tid: int) -> dict | None:
    """:func:`_idle` with the stream's idle probes paused (None without a stream): the background while frames
    come back within ``probe_after``, when those probes never run. A probe already sent is let finish first; the
    pause is then excused (runtime.wire.liveness.Liveness.excuse), or the stream, silent for longer than the
    floor because nothing asked, would be declared dead when the probes resume."""
    stream = agent.active.stream
    if stream is None or not stream.liveness.options.idle_probes:
        return None
    live = stream.liveness
    saved = live.options
    live.options = dataclasses.replace(saved, idle_probes=False)
    paused = live.clock()
    try:
        await asyncio.sleep(0.05)  # an answer on its way (one loopback round trip)
        return {**await _idle(seconds, loop_tid), "probe_after_s": saved.probe_after_seconds}
    finally:
        live.excuse(live.clock() - paused)
        live.options = saved


async def measure(args: argparse.Namespace, loaded, address: str, cgroup: Path | None) -> dict:
    """The whole measurement against the worker at ``address`` (this process already in ``cgroup``, if any)."""
    tl = None
    if args.tl:
        from runtime.transfer.artifact import load_tl

        tl = load_tl(args.tl, loaded=loaded)
    split = choose_split(loaded, args.split or (tl.split.name if tl is not None else ""))
    codec = get_codec(args.codec, model=tl.tl.entropy_model if tl is not None else None, spec=loaded.spec)
    xs = [f.tensor for f in open_source(loaded.spec, args.source, max(1, args.inputs))]
    agent = Agent(loaded, InitialPlan(split, codec, worker=address, tl=tl), AgentOptions(deadline_seconds=30.0))
    loop_tid = threading.get_native_id()
    board_cpu = time_board_jobs(agent)
    try:
        await agent.start()
        for i in range(args.warmup):
            await agent.infer(xs[i % len(xs)])
        idle = await _idle(args.idle_s, loop_tid, agent) if args.idle_s > 0 else None
        rounds = [await _round(agent, xs, args.frames, args.gap_ms / 1e3, loop_tid, cgroup, board_cpu)
                  for _ in range(args.rounds)]
        quiet = await _background(agent, args.idle_s, loop_tid) if args.idle_s > 0 else None
        alone = await asyncio.get_running_loop().run_in_executor(None, compute_alone, agent, xs, args.alone_runs,
                                                                 args.alone_gap_ms / 1e3)
    finally:
        await agent.close()
    return summarize(rounds, idle, alone, split.name, codec.name, tl.tl_id if tl is not None else "", quiet)


def summarize(rounds: list[dict], idle: dict | None, alone: dict[str, float], split: str, codec: str, tl: str,
              quiet: dict | None = None) -> dict:
    """Per-frame figures: the median over rounds of each round's CPU / frames (ms), and the runtime's own CPU.
    The background counted is ``quiet`` (idle probes paused, :func:`_background`) when every round's frames came
    back within its ``probe_after_s`` (the probes never ran), else ``idle``'s; ``background_window`` says which."""
    def per_frame(get) -> float:
        return statistics.median(get(r) / r["frames"] * 1e3 for r in rounds)

    compute = alone["head"] + alone["tl_encode"] + alone["encode"]
    wall_ms = per_frame(lambda r: r["wall_s"])
    slowest_s = max(r["wall_s"] / r["frames"] for r in rounds)
    use = quiet if quiet is not None and slowest_s < quiet["probe_after_s"] else idle
    bg = {k: (use["threads_per_s"][k] if use else 0.0) for k in GROUPS}
    bg_process = use["process_per_s"] if use else 0.0
    threads = {k: per_frame(lambda r, k=k: r["threads_s"][k]) for k in GROUPS}
    process = per_frame(lambda r: r["process_s"])
    # the frames' own board jobs, where the rounds timed them (older result files: not there)
    in_frames = ({"compute_in_frames": per_frame(lambda r: r["compute_in_frames_s"])}
                 if all("compute_in_frames_s" in r for r in rounds) else {})
    if in_frames:
        in_frames["runtime_beside"] = process - in_frames["compute_in_frames"] - bg_process * wall_ms
    return {
        "split": split, "codec": codec, "tl": tl, "rounds": rounds, "idle": idle, "compute_alone_ms": alone,
        "background_quiet": quiet, "background_window": "none" if use is None else ("quiet" if use is quiet else "idle"),
        "per_frame_ms": {
            "wall": wall_ms, "process": process, **{f"thread_{k}": v for k, v in threads.items()},
            "background": bg_process * wall_ms, "throttled": per_frame(lambda r: r["throttled_ms"] / 1e3),
            "compute_alone": compute,
            "runtime": process - compute - bg_process * wall_ms,
            "runtime_board": threads["board"] - compute - bg["board"] * wall_ms,
            "runtime_loop": threads["loop"] - bg["loop"] * wall_ms,
            "thread_board_loop": threads["board"] + threads["loop"],
            "runtime_board_loop": threads["board"] + threads["loop"] - compute - (bg["board"] + bg["loop"]) * wall_ms,
            "runtime_grpc": threads["grpc"] - bg["grpc"] * wall_ms,
            **in_frames,
        },
        "rounds_runtime_ms": [(r["process_s"] - bg_process * r["wall_s"]) / r["frames"] * 1e3 - compute for r in rounds],
        "wire_bytes_p50": statistics.median(r["wire_bytes_p50"] for r in rounds),
        "probes_per_frame": {k: sum(r["probes"].get(k, 0) for r in rounds) / sum(r["frames"] for r in rounds)
                             for k in rounds[0].get("probes", {})},
    }


def with_combined(per_frame: dict[str, float]) -> dict[str, float]:
    """``per_frame`` (a result's "per_frame_ms", of this version or an older one) with the board + loop figures,
    filled from their parts where an older file lacks them."""
    p = dict(per_frame)
    p.setdefault("thread_board_loop", p["thread_board"] + p["thread_loop"])
    if "runtime_board" in p and "runtime_loop" in p:
        p.setdefault("runtime_board_loop", p["runtime_board"] + p["runtime_loop"])
    return p


def markdown(out: dict) -> str:
    """The per-frame figures as a markdown table (FIGURES' keys as columns, ms), header and one row."""
    p = with_combined(out["per_frame_ms"])
    keys = [k for k, _ in FIGURES if k in p]
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys),
                      "| " + " | ".join(f"{p[k]:.3f}" for k in keys) + " |"])


def render(out: dict) -> str:
    p = with_combined(out["per_frame_ms"])
    a = out["compute_alone_ms"]
    lines = [
        f"agent CPU per frame: split {out['split']} codec {out['codec']}{' TL ' + out['tl'] if out['tl'] else ''}, "
        f"{out['wire_bytes_p50']:,.0f} B a frame, {len(out['rounds'])} rounds x {out['rounds'][0]['frames']} frames "
        f"(median of the rounds' per-frame figures)",
        f"  wall {p['wall']:.3f} ms   process CPU {p['process']:.3f} ms   throttled {p['throttled']:.3f} ms",
        "  by thread: " + "   ".join(f"{k} {p['thread_' + k]:.3f}" for k in GROUPS)
        + f"   (board + loop {p['thread_board_loop']:.3f})",
        f"  alone on the board thread: head {a['head']:.3f}  tl_encode {a['tl_encode']:.3f}  encode {a['encode']:.3f}"
        f"  (sum {p['compute_alone']:.3f})",
        f"  background (stream open, no frame{', idle probes paused' if out['background_window'] == 'quiet' else ''}) "
        f"over the frame's wall time: {p['background']:.3f}",
        *([f"  in the frames (each frame's board job, its own CPU): head + TL encoder + encode "
           f"{p['compute_in_frames']:.3f} (alone {p['compute_alone']:.3f}); the runtime beside them "
           f"{p['runtime_beside']:.3f}"] if "compute_in_frames" in p else []),
        f"  RUNTIME CPU per frame: {p['runtime']:.3f} ms (board + loop {p['runtime_board_loop']:.3f}: board thread "
        f"{p['runtime_board']:.3f}, event loop {p['runtime_loop']:.3f}; gRPC threads {p['runtime_grpc']:.3f}); per round: "
        + " ".join(f"{v:.3f}" for v in out["rounds_runtime_ms"]),
    ]
    idle = out["idle"]
    if idle:  # the background itself: timers, probes and pings with the stream open and no frame
        lines.append(f"  idle, stream open, no frame ({idle['wall_s']:.1f} s): process {idle['process_per_s'] * 1e3:.3f} ms/s "
                     "(" + "   ".join(f"{k} {idle['threads_per_s'][k] * 1e3:.3f}" for k in GROUPS) + ")")
    if idle and idle.get("probes"):
        lines.append("  idle liveness probes a second: " + "   ".join(
            f"{k} {v / idle['wall_s']:.2f}" for k, v in idle["probes"].items()))
    if out.get("probes_per_frame"):  # "held": sent while a frame's head computed (nothing outstanding yet)
        lines.append("  liveness probes per frame: " + "   ".join(f"{k} {v:.3f}" for k, v in out["probes_per_frame"].items()))
    quiet = out["background_quiet"]
    if quiet:  # the same with the idle probes paused: what runs beside frames answered within probe_after
        lines.append(f"  idle, probes paused ({quiet['wall_s']:.1f} s): process {quiet['process_per_s'] * 1e3:.3f} ms/s "
                     "(" + "   ".join(f"{k} {quiet['threads_per_s'][k] * 1e3:.3f}" for k in GROUPS) + ")")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the epilog's table of figures kept as written."""


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m runtime.measure.agent_cpu", description=__doc__.split("\n\n")[0],
                                 formatter_class=_HelpFormatter,
                                 epilog="per-frame figures (ms; JSON per_frame_ms, --markdown's columns):\n"
                                 + "\n".join(f"  {k:<19} {text}" for k, text in FIGURES)
                                 + "\nA lone frame's board work may run on the loop thread: compare board + loop, not "
                                 "the two apart.")
    ap.add_argument("--model", default="mobilenet_v2", help="a bundled model name or path:function")
    ap.add_argument("--split", default="input", help="split index or name ('' : the agent's default split)")
    ap.add_argument("--codec", default="webp", help="wire codec (webp, pixels+lz4, int8+lz4, ...)")
    ap.add_argument("--tl", default="", help="a Transfer Layer id or manifest (its split unless --split)")
    ap.add_argument("--source", default="samples", help="frames: samples (the bundled photos) or synthetic")
    ap.add_argument("--inputs", type=int, default=8, help="distinct input frames, cycled")
    ap.add_argument("--frames", type=int, default=40, help=f"frames per round, one at a time (1..{MAX_FRAMES})")
    ap.add_argument("--rounds", type=int, default=5, help=f"rounds (1..{MAX_ROUNDS}); figures are medians over them")
    ap.add_argument("--warmup", type=int, default=10, help="untimed frames first")
    ap.add_argument("--gap-ms", type=float, default=0.0, help=f"idle between frames (0..{MAX_GAP_MS:g} ms)")
    ap.add_argument("--idle-s", type=float, default=2.0, help="seconds of background measured with no frame (0: none)")
    ap.add_argument("--alone-runs", type=int, default=30, help="runs of the head and the encode timed on their own")
    ap.add_argument("--alone-gap-ms", type=float, default=20.0,
                    help=f"idle before each of those runs (0..{MAX_GAP_MS:g} ms; a frame's board work starts cold too)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    ap.add_argument("--quota-us", type=int, default=0, help="run the agent under this cgroup CPU quota per period (0: none)")
    ap.add_argument("--period-us", type=int, default=50_000, help="the quota's period (the headline benchmark's: 50 ms)")
    ap.add_argument("--json", default="", help="write every figure here")
    ap.add_argument("--markdown", action="store_true", help="also print the per-frame figures as a markdown table")
    args = ap.parse_args(argv)
    if not (1 <= args.frames <= MAX_FRAMES and 1 <= args.rounds <= MAX_ROUNDS and 0 <= args.gap_ms <= MAX_GAP_MS
            and 0 <= args.idle_s <= 60 and 1 <= args.alone_runs <= 1000 and 0 <= args.warmup <= 1000
            and 0 <= args.alone_gap_ms <= MAX_GAP_MS):
        ap.error("--frames, --rounds, --gap-ms, --idle-s, --alone-runs, --alone-gap-ms or --warmup out of range "
                 "(see --help)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if not Path("/proc/self/task").is_dir() or not Path("/proc/self/schedstat").exists():
        print("no per-thread CPU here: needs Linux's /proc/PID/task/TID/schedstat (CONFIG_SCHED_INFO)", file=sys.stderr)
        return 2
    from runtime.daemon.cgroup import CpuQuota, unavailable
    from runtime.worker.process import spawn_worker

    if args.quota_us:
        why = unavailable()
        if why:
            print(f"no CPU quota here: {why}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    worker = spawn_worker(["--torch-threads", str(args.threads), *(["--tl", args.tl] if args.tl else [])])
    quota = None
    try:
        if args.quota_us:
            quota = CpuQuota(f"edgesplit-agentcpu-{os.getpid()}", args.period_us, args.quota_us)
            (quota.path / "cgroup.procs").write_text(str(os.getpid()))  # after torch and the model are loaded
        out = eventloop.run(measure(args, loaded, worker.address, quota.path if quota else None))
    finally:
        if quota is not None:
            quota.remove()
        worker.stop()
    out.update(command="python -m runtime.measure.agent_cpu " + " ".join(sys.argv[1:] if argv is None else argv),
               model=loaded.name, loop=eventloop.loop_name(), machine=f"{platform.machine()} {os.cpu_count()} cores",
               quota_us=args.quota_us, period_us=args.period_us if args.quota_us else 0,
               finished_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    print(render(out))
    if args.markdown:
        print(markdown(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
