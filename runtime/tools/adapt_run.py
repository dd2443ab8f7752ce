"""The recorded adaptivity run (issue 11): planner, worker and agent as separate processes on loopback,
the agent's link through the netem relay stepping between rates with +-jitter, the board under a CPU
quota when cgroup v1 is available. Writes per-frame results, a timeline (set bandwidth, the agent's
estimate, split index, measured and predicted latency) as JSON, markdown and PNG, and checks the
issue's targets::

    python -m runtime.tools.adapt_run --out runtime/tools/results/adaptivity

Targets (reported, not asserted): first frame under the new plan <= 2 s after a step down and
<= 5 s after a step up; 0 frames lost or duplicated; <= 1 switch per 40 s of steady link under
the jitter; median |predicted - measured| latency within 10 % in each steady phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from runtime.daemon import cgroup
from runtime.tools import adapt_stages, cpuquota
from runtime.tools.netem import DelayProxy, LinkShape

CLI = [sys.executable, "-m", "runtime.cli.main"]
SETTLE = 5.0  # seconds after a step that are not "steady"
WARM_FRAMES = 8  # the warm-up ends once this many frames in a row, over SETTLE seconds, ran one configuration


def settled(frames: list[dict[str, Any]], now: float, estimate: float | None, quiet: float = SETTLE,
            count: int = WARM_FRAMES) -> bool:
    """Whether the agent has started for good: it measured its link (``estimate`` > 0), runs a planner's plan
    (version > 0), and its last ``count`` frames, the first of them ``quiet`` s or more ago, ran one
    configuration. Under the board's quota the agent's start-up (torch, the first plan, the first
    offload once the link is measured) took longer than a fixed 15 s warm-up, and its first offload
    then counted as a switch in the first steady phase (issue 11)."""
    if not estimate or estimate <= 0 or len(frames) < count:
        return False
    last = frames[-count:]
    if any(not r.get("plan_version") for r in last) or len({r["split"] for r in last}) != 1:
        return False
    split = last[-1]["split"]
    held = [r for r in frames if r["t"] >= now - quiet]  # lines come in order: a suffix of frames
    if len(held) == len(frames):  # nothing older than ``quiet``: not held that long yet
        return False
    return frames[-len(held) - 1]["split"] == split and all(r["split"] == split for r in held)


def _phases(text: str) -> list[tuple[float, float]]:
    """'50:40,1:40,50:40' -> [(Mbit/s, seconds), ...]"""
    return [(float(a), float(b)) for a, b in (p.split(":") for p in text.split(","))]


async def _run(cmd: list[str], quota: cgroup.CpuQuota | None = None, **kw: Any) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*cmd, **kw)
    if quota is not None:
        quota.add(proc.pid)
    return proc


async def _port(path: Path, proc: asyncio.subprocess.Process, what: str, timeout: float = 60.0) -> int:
    t0 = time.monotonic()
    while not (path.exists() and path.read_text().strip()):
        if proc.returncode is not None or time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what} did not start (exit {proc.returncode})")
        await asyncio.sleep(0.1)
    return int(path.read_text().strip())


def _scrape(port: int, link: str, pattern: str = "") -> float | None:
    """The agent's bandwidth estimate for ``link`` (or the figure ``pattern`` matches) from its metrics."""
    return _scrape_all(port, [pattern or _link_figure("bandwidth_bytes_per_second", link)])[0]


def _link_figure(name: str, link: str) -> str:
    return r"edgesplit_agent_link_estimate_" + name + r'\{link="' + re.escape(link) + r'"\} (\S+)'


def _scrape_all(port: int, patterns: list[str]) -> list[float | None]:
    """The figures ``patterns`` match in one read of the agent's metrics (None: not there, or no answer)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0).read().decode()
    except OSError:
        return [None] * len(patterns)
    found = [re.search(p, text, re.M) for p in patterns]
    return [float(m.group(1)) if m else None for m in found]


DROPPED = r"^edgesplit_agent_dropped_frames_total (\S+)"  # frames the agent's --fps pacing dropped (runtime.agent.pacing)


async def record(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    phases = _phases(args.phases)
    rng = random.Random(args.seed)
    why_not = cgroup.unavailable()
    quotas = contextlib.ExitStack()
    board = None
    if why_not is None and args.board_share > 0:
        qs = quotas.enter_context(cpuquota.QuotaSet(f"edgesplit-adapt-{os.getpid()}"))
        board = qs.new(args.board_share, args.board_period_us)
    common = ["--model", args.model]
    try:
        for role, quota, given in (("device", board, args.device_profile), ("edge", None, args.edge_profile)):
            if given:  # measured elsewhere (bench-scenarios: the board's profile scaled to its quota)
                (tmp / f"{role}.json").write_bytes(Path(given).read_bytes())
                continue
            p = await _run([*CLI, "profile", *common, "--role", role, "--machine", role, "--runs", str(args.runs),
                            "--no-progress", "--out", str(tmp / f"{role}.json")], quota)
            if await p.wait():
                raise RuntimeError(f"profiling the {role} failed")
        relay = await DelayProxy("127.0.0.1:1", LinkShape(args.delay_ms / 1e3, phases[0][0] * 125_000.0),
                                 buffer_bytes=64 * 1024).start()
        procs = []
        planner = await _run([*CLI, "planner", "serve", "--listen", "127.0.0.1:0", "--port-file", str(tmp / "planner.port"),
                              "--db", str(tmp / "planner.sqlite"), "--hold-seconds", str(args.hold)])
        procs.append(planner)
        paddr = f"127.0.0.1:{await _port(tmp / 'planner.port', planner, 'the planner')}"
        user_model = ["--models", args.model] if ":" in args.model else []  # a bundled model needs none
        worker = await _run([*CLI, "worker", "--listen", "127.0.0.1:0", "--port-file", str(tmp / "worker.port"),
                             "--planner", paddr, "--profiles", str(tmp / "edge.json"), "--worker-id", "edge-1",
                             "--advertise", relay.address, *user_model,
                             *(["--torch-threads", str(args.worker_threads)] if args.worker_threads else [])])
        procs.append(worker)
        relay.target = ("127.0.0.1", await _port(tmp / "worker.port", worker, "the worker"))
        await asyncio.sleep(2.0)  # the worker registers
        total = sum(s for _, s in phases) + max(args.warmup, args.warmup_max)
        agent = await _run([*CLI, "agent", *common, "--planner", paddr, "--profile", str(tmp / "device.json"),
                            "--agent-id", "board-1", "--source", args.source, "--frames", str(int(total * args.fps * 2)),
                            "--fps", str(args.fps), "--window", "2", "--deadline-seconds", str(args.deadline),
                            "--metrics-port", "0", "--no-summary", "--telemetry-interval-seconds", "0.5"],
                           None if args.board_join_after_start else board,
                           stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        procs.append(agent)
        run = await _drive(args, phases, rng, relay, agent, procs, board if args.board_join_after_start else None)
    finally:
        quotas.close()
    try:  # what the planner predicted, part by part, for each plan it issued (runtime.tools.adapt_stages)
        plans = adapt_stages.plan_breakdowns(tmp / "planner.sqlite", "board-1")
    except Exception as e:  # the run's figures stand without it; the report says so
        print(f"plan breakdowns not read back: {e}", file=sys.stderr)
        plans = {}
    run["breakdowns"] = [[v, split, parts] for (v, split), parts in plans.items()]
    if args.keep_planner_db:  # every plan with its fallback table, for a closer look afterwards
        import shutil

        shutil.copyfile(tmp / "planner.sqlite", args.keep_planner_db)
    return run


async def _drive(args: argparse.Namespace, phases: list[tuple[float, float]], rng: random.Random, relay: DelayProxy,
                 agent: asyncio.subprocess.Process, procs: list[asyncio.subprocess.Process],
                 join: cgroup.CpuQuota | None = None) -> dict[str, Any]:
    """``join``: the board's quota, which the agent enters once it has started (torch loaded, plan link up)."""
    assert agent.stdout is not None and agent.stderr is not None  # started with both piped (record)
    stdout, stderr = agent.stdout, agent.stderr
    frames: list[dict[str, Any]] = []
    timeline: list[dict[str, Any]] = []
    t0 = time.monotonic()
    wall0 = time.time()  # result lines carry wall-clock stamps (started_unix, finished_unix)
    metrics_port = None

    log = open(args.agent_log, "wb") if args.agent_log else None  # noqa: SIM115 (closed below)

    async def read_stderr() -> None:
        nonlocal metrics_port
        async for line in stderr:
            if log is not None:
                log.write(line)
            m = re.search(rb"metrics on http://[^:]+:(\d+)/", line)
            if m:
                metrics_port = int(m.group(1))
                if join is not None:
                    join.add(agent.pid)

    async def read_stdout() -> None:
        async for line in stdout:
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                r["t"] = time.monotonic() - t0  # when its line came (lines come in frame order)
                if "started_unix" in r:  # when the frame arrived and when its result was ready
                    r["t_start"], r["t_end"] = r["started_unix"] - wall0, r["finished_unix"] - wall0
                frames.append(r)

    readers = [asyncio.create_task(read_stderr()), asyncio.create_task(read_stdout())]
    steps: list[tuple[float, float]] = []
    warmed = 0.0
    try:
        # the first plan (probes, then offloading): at least --warmup s, then until the agent runs one
        # configuration for good (settled), at most --warmup-max s
        while time.monotonic() - t0 < args.warmup_max:
            now = time.monotonic() - t0
            est = _scrape(metrics_port, relay.address) if metrics_port else None
            if now >= args.warmup and settled(frames, now, est):
                break
            await asyncio.sleep(0.5)
        warmed = time.monotonic() - t0
        for mbps, seconds in phases:
            steps.append((time.monotonic() - t0, mbps))
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                rate = mbps * 125_000.0 * rng.uniform(1 - args.jitter, 1 + args.jitter)
                relay.set_shape(rate_bytes_per_second=rate)
                for _ in range(2):
                    # one read: the estimate, the base RTT the agent's figures are reduced by (issue 11: lifted by the
                    # board's CPU stalls it made a probe read ~3x the link), and the frames the pacing dropped
                    est, rtt, dropped = _scrape_all(metrics_port, [
                        _link_figure("bandwidth_bytes_per_second", relay.address),
                        _link_figure("rtt_seconds", relay.address), DROPPED]) if metrics_port else (None, None, None)
                    timeline.append({"t": time.monotonic() - t0, "set_bps": rate, "estimate_bps": est,
                                     "rtt_s": rtt, "dropped": dropped})
                    await asyncio.sleep(0.5)
    finally:
        for p in reversed(procs):
            if p.returncode is None:
                p.terminate()
        for p in procs:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(p.wait(), 15)
        for task in readers:
            task.cancel()
        if log is not None:
            log.close()
        await relay.close()
    return {"frames": frames, "timeline": timeline, "steps": steps, "args": vars(args), "warmup_s": round(warmed, 2)}


def _start(r: dict[str, Any]) -> float:
    """When the frame arrived, run-relative (the line's time for lines without stamps)."""
    t: float = r.get("t_start", r["t"])
    return t


def _end(r: dict[str, Any]) -> float:
    """When the frame's result was ready, run-relative."""
    t: float = r.get("t_end", r["t"])
    return t


def _config(r: dict[str, Any]) -> str:
    """The configuration a frame ran under: its split ("output": the plan runs on the board). A frame
    of an offloading plan that fell back to the board (deadline, broken stream) still ran under it."""
    split: str = r["split"]
    return split


def _waited_ms(r: dict[str, Any]) -> float:
    """How long a frame that fell back waited for the worker: its total less the board's stages."""
    t: dict[str, float] = r["times_ms"]
    return t.get("total", 0.0) - sum(t.get(k, 0.0) for k in ("board_queue", "head", "tl_encode", "encode", "local_tail"))


def analyse(run: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets from a recorded run."""
    frames, steps = sorted(run["frames"], key=lambda r: r["seq"]), run["steps"]
    seqs = [r["seq"] for r in frames]
    lost = (seqs[-1] - seqs[0] + 1 - len(set(seqs))) if seqs else 0
    out: dict[str, Any] = {"frames": len(frames), "lost": lost, "duplicated": len(seqs) - len(set(seqs)), "phases": []}
    plans = {(v, split): parts for v, split, parts in run.get("breakdowns", [])}
    ends = [t for t, _ in steps[1:]] + [max((_start(r) for r in frames), default=0.0) + 1e-3]
    prev, prev_plan = None, None
    for (start, mbps), end in zip(steps, ends, strict=True):
        inside = [r for r in frames if start <= _start(r) < end]
        steady = [r for r in inside if _start(r) >= start + SETTLE]
        ph: dict[str, Any] = {"mbps": mbps, "start_s": round(start, 2), "seconds": round(end - start, 2), "frames": len(inside)}
        drops = [p["dropped"] for p in run.get("timeline", []) if p.get("dropped") is not None and start <= p["t"] < end]
        ph["dropped_frames"] = int(drops[-1] - drops[0]) if len(drops) > 1 else None  # by the pacer: no room in the window
        if steady:
            new = statistics.mode(_config(r) for r in steady[len(steady) // 2:])
            first = next((r for r in inside if _config(r) == new), None)
            ph["plan"] = new
            ph["fallback_frames"] = sum(1 for r in inside if r["where"] == "local" and r["split"] != "output")
            # frames in flight on a link the agent left on proof of its collapse (runtime.agent.fallbacks give_up):
            # their wait ends with the deadline's reason before the deadline, which nothing else does
            deadline_ms = 1e3 * float(run.get("args", {}).get("deadline", 2.0))
            ph["given_up_frames"] = sum(1 for r in inside if (r.get("fallback_reason") or "").startswith("given up")
                                        or ((r.get("fallback_reason") or "").startswith("deadline")  # older records
                                            and _waited_ms(r) < 0.9 * deadline_ms))
            changed = prev_plan is not None and new != prev_plan  # None: the plan did not change with the link
            ph["first_frame_under_new_plan_s"] = round(_end(first) - start, 2) if changed and first else None
            ph["first_frame_started_under_new_plan_s"] = round(_start(first) - start, 2) if changed and first else None
            ph["step"] = None if prev is None else ("down" if mbps < prev else "up")
            prev_plan = new
            switches = sum(1 for a, b in itertools.pairwise(steady) if _config(a) != _config(b))
            span = _start(steady[-1]) - _start(steady[0])
            ph["switches_per_40s_steady"] = round(switches * 40.0 / span, 2) if span > 0 else None
            errs = [abs(r["predicted_ms"] - r["times_ms"]["total"]) / r["times_ms"]["total"]
                    for r in steady if r.get("predicted_ms") and r["times_ms"].get("total")]
            ph["median_rel_error"] = round(statistics.median(errs), 3) if errs else None
            ph["stages"] = adapt_stages.by_stage([r for r in steady if _config(r) == new], plans) if plans else None
        out["phases"].append(ph)
        prev = mbps
    return out


def _targets(a: dict[str, Any]) -> list[str]:
    lines = [f"- frames lost {a['lost']}, duplicated {a['duplicated']} (target 0): "
             f"{'met' if a['lost'] == 0 == a['duplicated'] else 'NOT met'}"]
    prev_plan = None
    for ph in a["phases"]:
        if ph.get("step"):
            bound = 2.0 if ph["step"] == "down" else 5.0
            got, began = ph.get("first_frame_under_new_plan_s"), ph.get("first_frame_started_under_new_plan_s")
            verdict = ("met" if began is not None and began <= bound else "NOT met") + " by its start, " + (
                "met" if got is not None and got <= bound else "NOT met") + " by its result"
            fell = (f"{ph.get('fallback_frames')} frames fell back to the board, {ph.get('given_up_frames')} of them "
                    "given up on the collapsed link")
            if got is None and began is None and ph.get("plan") == prev_plan:
                lines.append(f"- step {ph['step']} to {ph['mbps']:g} Mbit/s: no new plan ({ph.get('plan')} stays the "
                             f"best at this rate): nothing to time; {fell}")
            else:
                lines.append(f"- step {ph['step']} to {ph['mbps']:g} Mbit/s: the first frame under the new plan started "
                             f"{began} s after the step, its result {got} s (target <= {bound:g} s): {verdict}; {fell}")
        prev_plan = ph.get("plan")
        sw, err = ph.get("switches_per_40s_steady"), ph.get("median_rel_error")
        lines.append(f"- {ph['mbps']:g} Mbit/s steady: {sw} switches per 40 s (target <= 1): "
                     f"{'met' if sw is not None and sw <= 1 else 'NOT met'}; median |predicted - measured| "
                     f"{err} (target <= 0.10): {'met' if err is not None and err <= 0.10 else 'NOT met'}; "
                     f"{ph.get('dropped_frames')} frames dropped by the --fps pacing")
    return lines


def plot(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl, frames = run["timeline"], sorted(run["frames"], key=_start)
    fig, ax = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    ax[0].plot([p["t"] for p in tl], [p["set_bps"] * 8e-6 for p in tl], label="set (relay)")
    est = [(p["t"], p["estimate_bps"] * 8e-6) for p in tl if p["estimate_bps"]]
    ax[0].plot([t for t, _ in est], [v for _, v in est], label="agent estimate")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("Mbit/s")
    ax[0].legend()
    names = sorted({r["split"] for r in frames})
    ax[1].scatter([_start(r) for r in frames], [names.index(r["split"]) for r in frames], s=6,
                  c=["tab:blue" if r["where"] == "edge" else "tab:red" for r in frames])
    ax[1].set_yticks(range(len(names)), names)
    ax[1].set_ylabel("split (blue edge, red local)")
    ax[2].plot([_start(r) for r in frames], [r["times_ms"].get("total", 0) for r in frames], ".", ms=3, label="measured")
    pred = [(_start(r), r["predicted_ms"]) for r in frames if r.get("predicted_ms")]
    ax[2].plot([t for t, _ in pred], [v for _, v in pred], ".", ms=3, label="predicted")
    ax[2].set_yscale("log")
    ax[2].set_ylabel("latency, ms")
    ax[2].set_xlabel("seconds (frames at their arrival)")
    ax[2].legend()
    for a in ax:
        for t, _ in run["steps"]:
            a.axvline(t, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.adapt_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results prefix: writes PREFIX.json, PREFIX.md, PREFIX.png")
    p.add_argument("--model", default="resnet18", help="bundled model or path/to/file.py:factory (default: resnet18)")
    p.add_argument("--phases", default="50:40,1:40,50:40", help="MBITS:SECONDS,... (default: 50:40,1:40,50:40)")
    p.add_argument("--jitter", type=float, default=0.2, help="relay rate varies uniformly by +-this each second")
    p.add_argument("--delay-ms", type=float, default=5.0, help="one-way delay of the relay (default: 5)")
    p.add_argument("--board-share", type=float, default=0.25,
                   help="CPU share of one core for the board (cgroup v1; 0: none; default: 0.25)")
    p.add_argument("--board-period-us", type=int, default=cgroup.PERIOD_US,
                   help="cgroup cfs period of the board's quota; a share under 0.1 core needs a longer one (the "
                        "kernel's smallest quota is 1 ms) (default: %(default)s)")
    p.add_argument("--worker-threads", type=int, default=1,
                   help="the worker's --torch-threads (0: torch's default, one per core); default 1, the thread count "
                        "its profile is measured at (edgesplit profile --threads): two threads on a shared 2-core "
                        "machine ran ResNet-18's tail 3-10x slower than profiled")
    p.add_argument("--device-profile", default="", help="the board's profile to use instead of profiling it here")
    p.add_argument("--edge-profile", default="", help="the edge's profile to use instead of profiling it here")
    p.add_argument("--board-join-after-start", action="store_true",
                   help="start the agent unrestricted and move it under the board's quota once it has started "
                        "(importing torch at a few %% of a core takes minutes)")
    p.add_argument("--source", default="samples",
                   help="the agent's --source: 'samples' (default: the bundled photos, which the profiles are measured "
                        "on) or 'synthetic' (random noise: its JPEG is about twice the photos' bytes, which the "
                        "profile does not know)")
    p.add_argument("--fps", type=float, default=4.0, help="camera rate of the agent (default: 4)")
    p.add_argument("--deadline", type=float, default=2.0, help="agent --deadline-seconds (default: 2)")
    p.add_argument("--hold", type=float, default=3.0, help="planner --hold-seconds (default: 3)")
    p.add_argument("--warmup", type=float, default=15.0,
                   help="least seconds before the first phase; the first phase then waits until the agent has measured "
                        "its link and run one configuration for 8 frames over 5 s (default: 15)")
    p.add_argument("--warmup-max", type=float, default=120.0,
                   help="most seconds before the first phase, settled or not (default: 120)")
    p.add_argument("--runs", type=int, default=5, help="profile runs per block (default: 5)")
    p.add_argument("--seed", type=int, default=11, help="jitter seed")
    p.add_argument("--agent-log", default="", help="write the agent's log (stderr) to this file")
    p.add_argument("--reanalyse", default="", help="run nothing: analyse the run recorded in this PREFIX.json again "
                                                   "and write --out's files")
    p.add_argument("--keep-planner-db", default="", help="copy the planner's SQLite store (every plan issued, with its "
                                                         "fallback table) to this file")
    return p


def _la(triple: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in triple)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m runtime.tools.adapt_run " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.reanalyse:  # a recorded run again, under this version's analysis
        run = json.loads(Path(args.reanalyse).read_text())
        run.pop("analysis", None)
        orig = run.get("command") or "python -m runtime.tools.adapt_run --phases " + run["args"]["phases"]
        cited = f"`{orig}` (analysed again with `{command}`)"
        out_arg = args.out
        args = argparse.Namespace(**{**vars(args), **run["args"], "out": out_arg})  # the run's settings
    else:
        load = [os.getloadavg()]
        with tempfile.TemporaryDirectory(prefix="edgesplit-adapt-") as tmp:
            run = asyncio.run(record(args, Path(tmp)))
        load.append(os.getloadavg())
        run["load_average"] = [[round(x, 2) for x in la] for la in load]
        run["command"] = command
        cited = f"`{command}`"
    result = analyse(run)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"analysis": result, **run}, indent=1))
    plot(run, out.with_suffix(".png"))
    board = "none (cgroup v1 unavailable)" if cgroup.unavailable() else f"{args.board_share:g} of a core"
    md = [f"# Adaptivity run: {args.model}, phases {args.phases} (Mbit/s:s), +-{args.jitter:.0%} jitter", "",
          f"Command: {cited}; board CPU: {board}; relay delay {args.delay_ms:g} ms each way; load average "
          f"(1/5/15 min) {_la(run['load_average'][0])} at the start, {_la(run['load_average'][1])} at the end "
          f"(a 2-core machine shared with other jobs); warm-up {run.get('warmup_s')} s.", "",
          f"![timeline]({out.with_suffix('.png').name})", "", "## Targets", "", *_targets(result), "",
          "## Predicted and measured latency by stage", "",
          "Medians over the steady frames that ran the phase's plan where it said (runtime.tools.adapt_stages).", "",
          *adapt_stages.table(result["phases"]), "",
          "## Phases", "", "```json", json.dumps(result["phases"], indent=1), "```", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(_targets(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
