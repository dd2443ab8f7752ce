"""The emulated board: a child process that loads the model, joins the CPU-quota cgroup, calibrates
the quota to the target slowdown, profiles the model there, then runs each strategy it is told
(one JSON line per job on stdin, one JSON line per answer on stdout).

    python -m runtime.measure.scenarios.device '{"model": ..., "cgroup": ..., ...}'

It joins the group only after torch and the model are loaded (importing torch under a 5 % quota
takes minutes); what it times afterwards runs under the quota, its gRPC threads included.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.frame import FrameResult
from runtime.agent.sources import open_source
from runtime.daemon.cgroup import ROOT as CGROUP_ROOT
from runtime.measure.profiler import profile_model
from runtime.measure.scenarios import calibrate as calibration
from runtime.models.loader import LoadedModel, load_model
from runtime.models.spec import ModelSpec, source_pixels
from runtime.transfer.artifact import load_tl
from runtime.wire import eventloop
from runtime.wire.codec import get_codec
from runtime.wire.pixels import is_pixels
from runtime.wire.webp import is_webp


def _time_full(loaded: LoadedModel, xs: list[torch.Tensor], runs: int, start: int = 0) -> tuple[list[float], list[int]]:
    """``runs`` whole-model passes back to back (frame ``(start + i) % len(xs)``), as the local strategy runs:
    seconds, top-1."""
    times, top1 = [], []
    with torch.inference_mode():
        for i in range(start, start + runs):
            t = time.perf_counter()
            y = loaded.full(xs[i % len(xs)])
            times.append(time.perf_counter() - t)
            top1.append(int(y.argmax()))
    return times, top1


def _join(cgroup: str | Path) -> None:
    """Move this process (every thread) into ``cgroup``."""
    (Path(cgroup) / "cgroup.procs").write_text(str(os.getpid()))


class Board:
    """The passes :mod:`runtime.measure.scenarios.calibrate` asks for: unrestricted (this process back in the root
    group) or under the quota (in the board's group, one untimed pass first), each as the local run times them."""

    def __init__(self, loaded: LoadedModel, xs: list[torch.Tensor], cgroup: str):
        self.loaded, self.xs, self.cgroup = loaded, xs, cgroup
        self.top1: list[int] = []  # the last board passes' top-1 (the local run's reference)

    def set_quota(self, quota_us: int) -> None:
        (Path(self.cgroup) / "cpu.cfs_quota_us").write_text(str(quota_us))

    def free(self, n: int) -> list[float]:
        _join(CGROUP_ROOT)
        _time_full(self.loaded, self.xs, 1)
        return [t * 1e3 for t in _time_full(self.loaded, self.xs, n)[0]]

    def board(self, n: int) -> list[float]:
        _join(self.cgroup)
        _time_full(self.loaded, self.xs, 1)
        times, self.top1 = _time_full(self.loaded, self.xs, n)
        return [t * 1e3 for t in times]

    def local(self, lo: int, hi: int, warmup: int) -> dict[str, Any]:
        """The local strategy in a round: frames ``lo``..``hi`` through ``loaded.full`` under the quota, back to back
        as :meth:`board` times the calibration's local run, after ``warmup`` untimed passes (as the strategies' jobs
        warm up); the same rows' fields the strategies' jobs return where they apply (ms, top-1, the quota's hold)."""
        _join(self.cgroup)
        _time_full(self.loaded, self.xs, warmup)
        rows = []
        for i in range(lo, hi):
            held, cpu = quota_held(self.cgroup), time.process_time()
            (t,), (top1,) = _time_full(self.loaded, self.xs, 1, start=i)
            cpu, after = time.process_time() - cpu, quota_held(self.cgroup)
            rows.append({"total_ms": t * 1e3, "class_index": top1, "throttled_ms": after[0] - held[0],
                         "throttled_periods": after[1] - held[1], "board_cpu_ms": cpu * 1e3})
        return {"rows": rows}


def settings(tb: dict[str, Any], frames: int) -> calibration.Settings:
    return calibration.Settings(target=tb["target_slowdown"], tolerance=tb["tolerance"], period_us=tb["period_us"],
                                first_quota_us=tb["first_quota_us"], rounds=tb["calibrate_rounds"],
                                runs=tb["calibrate_runs"], frames=frames, local_rounds=tb["local_rounds"])


def jpeg_frames(spec: ModelSpec, xs: list[torch.Tensor], quality: int, gap_s: float = 0.0) -> list[dict[str, Any]]:
    """Each frame as a camera sends it: pixels (undoing the normalisation) -> JPEG; timed encode and bytes
    (the board's JPEG encode in edgesplit's cost model; edge-only itself runs the wire's jpeg codec), each after
    ``gap_s`` idle as in :func:`time_heads`."""
    from PIL import Image

    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    out = []
    for x in xs:
        time.sleep(gap_s)
        t = time.perf_counter()
        pix = source_pixels(x)  # as the agent's jpeg codec sends the frame: its source's pixels
        if pix is None:
            pix = (x[0] * std + mean).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        buf = io.BytesIO()
        Image.fromarray(pix).save(buf, format="JPEG", quality=quality)
        enc = time.perf_counter() - t
        data = buf.getvalue()
        out.append({"encode_s": enc, "bytes": len(data), "jpeg": data})
    return out


def codec_frames(spec: ModelSpec, xs: list[torch.Tensor], name: str, gap_s: float = 0.0) -> list[dict[str, Any]]:
    """Each frame through the wire codec ``name`` at the input (pixels+lz4, webp): timed encode and wire bytes,
    one frame at a time on the board, each after ``gap_s`` idle (its encode time in edgesplit's cost model, as for
    the JPEG)."""
    codec = get_codec(name, spec=spec)
    out = []
    for x in xs:
        time.sleep(gap_s)
        t = time.perf_counter()
        msg = codec.encode(x)
        out.append({"encode_ms": (time.perf_counter() - t) * 1e3, "bytes": msg.ByteSize()})
    return out


def prefix_heads(loaded: LoadedModel, xs: list[torch.Tensor], runs: int, gap_s: float = 0.0) -> dict[str, Any]:
    """Every head at once: ``runs`` passes through the blocks in order (after one untimed), each after ``gap_s`` idle
    (one quota period: a frame's head starts with the period's whole budget, :func:`time_heads`), the time from the
    pass's start to the end of each block. The median per cut prices the head that ends there with the quota's stalls
    where they fell in a real pass; per-block medians put them in whichever blocks crossed a period's end."""
    n = len(loaded.sliced.split_points)
    segs = [loaded.segment(i, i + 1) for i in range(n - 1)]
    passes = []
    with torch.inference_mode():
        for r in range(runs + 1):
            time.sleep(gap_s)
            x, t0, row = xs[r % len(xs)], time.perf_counter(), [0.0]
            for seg in segs:
                x = seg(x)
                row.append((time.perf_counter() - t0) * 1e3)
            if r:
                passes.append(row)
    return {"ms": [statistics.median(p[k] for p in passes) for k in range(n)], "runs": runs, "gap_s": gap_s}


def time_heads(loaded: LoadedModel, xs: list[torch.Tensor], cands: list[dict[str, Any]], runs: int, gap_s: float = 0.0,
               budget_s: float | None = None) -> list[dict[str, Any]]:
    """Each candidate head on the board as the agent runs it (``loaded.head``), then each of its transfers' TL encoder
    and wire codec on that output, one frame at a time for ``runs`` frames after one untimed: ms per frame.

    Each frame starts after ``gap_s`` idle (the harness passes one quota period), as a frame does when frames go one at
    a time: the board idles while the last frame's bytes cross the link and the edge runs its tail, so the quota's
    budget is whole again. Back to back, a head started wherever the last one left the budget: a 0.1 ms head
    that found it spent waited for the next period (MobileNetV2's features_0_0: 23.9 ms against 1.0 ms in whole
    passes, 2026-12-03). With ``budget_s``, no candidate is started once that many seconds have passed (the ones
    timed are returned; the caller lists the rest)."""
    out: list[dict[str, Any]] = []
    start = time.monotonic()
    for c in cands:
        if budget_s is not None and out and time.monotonic() - start > budget_s:
            break
        head = loaded.head(c["split"])
        ways = []
        for t in c["transfers"]:
            tl = load_tl(t["tl"], loaded=loaded) if t.get("tl") else None
            ways.append((tl, get_codec(t["codec"], model=tl.tl.entropy_model if tl is not None else None,
                                       spec=loaded.spec), {**t, "tl_ms": [], "encode_ms": []}))
        head_ms = []
        for r in range(runs + 1):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            with torch.inference_mode():
                h = head(xs[r % len(xs)])
            if r:
                head_ms.append((time.perf_counter() - t0) * 1e3)
            for tl, codec, got in ways:
                t1 = time.perf_counter()
                with torch.inference_mode():
                    z = tl.tl.encoder(h) if tl is not None else h
                t2 = time.perf_counter()
                codec.encode(z)
                if r:
                    got["tl_ms"].append((t2 - t1) * 1e3)
                    got["encode_ms"].append((time.perf_counter() - t2) * 1e3)
        out.append({"split": c["split"], "cut": c["cut"], "head_ms": head_ms, "transfers": [g for _, _, g in ways]})
    return out


async def run_split(loaded: LoadedModel, job: dict[str, Any], xs: list[torch.Tensor]) -> dict[str, Any]:
    """One strategy: the frames (``frames_from`` to ``frames_to``, a round's; default all) through an agent at the
    job's split, codec and TL, one in flight, after ``warmup`` untimed ones; then, with ``window`` > 1,
    ``pipeline_frames`` frames with that many in flight (frames/s over the pass)."""
    tl = load_tl(job["tl"], loaded=loaded) if job.get("tl") else None
    split = next(p for p in loaded.sliced.split_points if p.name == job["split"])
    codec = get_codec(job["codec"], model=tl.tl.entropy_model if tl is not None else None, spec=loaded.spec)
    agent = Agent(loaded, InitialPlan(split, codec, worker=job["address"], tl=tl),
                  AgentOptions(deadline_seconds=job.get("deadline_s", 60.0)))
    await agent.start()
    try:
        for i in range(job["warmup"]):
            await agent.infer(xs[i % len(xs)])
        rows = []
        for i in range(job.get("frames_from", 0), job.get("frames_to", len(xs))):  # this round's frames
            x = xs[i]
            held, cpu = quota_held(job.get("cgroup", "")), time.process_time()
            r = await agent.infer(x, frame=str(i))
            cpu, after = time.process_time() - cpu, quota_held(job.get("cgroup", ""))
            rows.append({"where": r.where, "reason": r.fallback_reason, "wire_bytes": r.wire_bytes,
                         "class_index": r.top1()[0], "times_ms": {k: v * 1e3 for k, v in r.times.items()},
                         "throttled_ms": after[0] - held[0], "throttled_periods": after[1] - held[1],
                         "board_cpu_ms": cpu * 1e3})
        out: dict[str, Any] = {"rows": rows}
        if job.get("window", 1) > 1 and job.get("pipeline_frames", 0) > 0:
            out["pipelined"] = await _pipelined(agent, xs, job["window"], job["pipeline_frames"])
        return out
    finally:
        await agent.close()


def quota_held(cgroup: str) -> tuple[float, int]:
    """The board's cgroup's time held by the quota so far, ms, and the periods in which it was held (``cpu.stat``
    throttled_time, summed over the CPUs its threads ran on, and nr_throttled; zeros without a group)."""
    if not cgroup:
        return 0.0, 0
    stat = dict(line.partition(" ")[::2] for line in (Path(cgroup) / "cpu.stat").read_text().splitlines())
    return int(stat.get("throttled_time", 0)) / 1e6, int(stat.get("nr_throttled", 0))


async def _pipelined(agent: Agent, xs: list[torch.Tensor], window: int, frames: int) -> dict[str, Any]:
    """``frames`` frames, ``window`` in flight at a time (a new one starts as one ends)."""
    gate = asyncio.Semaphore(window)

    async def one(i: int) -> FrameResult:
        async with gate:
            return await agent.infer(xs[i % len(xs)], frame=f"p{i}")

    t = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(frames)))
    seconds = time.perf_counter() - t
    return {"window": window, "frames": frames, "seconds": seconds, "fps": frames / seconds,
            "local_fallbacks": sum(r.where != "edge" for r in results)}


def _readline_json(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The child's next JSON line (the runner's side of the protocol); RuntimeError when it dies or is late."""
    import selectors

    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        assert proc.stdout is not None
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(min(1.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the board child exited (code {proc.poll()})")
                if line.startswith("{"):
                    got: dict[str, Any] = json.loads(line)
                    return got
            elif proc.poll() is not None:
                raise RuntimeError(f"the board child exited (code {proc.returncode})")
    raise RuntimeError(f"the board child did not answer within {timeout:g} s")


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    # glibc's allocator as the agent sets it (eventloop.run does, in the first strategy job): the calibration, the
    # local run and the profile ran with the defaults before, every pass faulting fresh pages in, and the strategies
    # and the recheck after with it set. MobileNetV2 at 4718 us, 20:04 UTC: 301/303 and 354/350 ms a pass set,
    # 404/402 and 401/376 ms by default (10-pass blocks in turn); local 451-496 ms, recheck 250 ms in two runs.
    eventloop.tune_malloc()
    torch.set_num_threads(cfg["testbed"]["threads"])
    loaded = load_model(cfg["model"])
    xs = [f.tensor for f in open_source(loaded.spec, "samples", cfg["frames"])]
    board = Board(loaded, xs, cfg["cgroup"])
    gap_s = cfg["testbed"]["period_us"] / 1e6  # one quota period idle before each timed head (time_heads)
    out: dict[str, Any] = {}

    def profile() -> None:  # between the coarse rounds and the local run, under the coarse quota
        prof = profile_model(loaded, "device", machine="board", runs=cfg["profile_runs"], warmup=1,
                             codecs=cfg["codecs"], tls=cfg["tls"], threads=cfg["testbed"]["threads"], progress=False,
                             inputs=cfg.get("profile_inputs", 4), jpeg_fidelity=cfg.get("jpeg_fidelity", True))
        Path(cfg["profile_out"]).write_text(prof.to_json())
        out["prefix_heads"] = prefix_heads(loaded, xs, cfg.get("head_runs", 10), gap_s)
        jp = jpeg_frames(loaded.spec, xs, cfg["jpeg_quality"], gap_s)
        Path(cfg["jpeg_out"]).mkdir(parents=True, exist_ok=True)
        for i, j in enumerate(jp):
            (Path(cfg["jpeg_out"]) / f"{i}.jpg").write_bytes(j["jpeg"])
        out["jpeg"] = [{"encode_ms": j["encode_s"] * 1e3, "bytes": j["bytes"]} for j in jp]
        out["input_codecs"] = {c: codec_frames(loaded.spec, xs, c, gap_s) for c in cfg["codecs"]
                               if is_pixels(c) or is_webp(c)}

    # the quota, calibrated on the local run itself: the local strategy's frames are its last run (calibrate.py)
    cal = calibration.calibrate(settings(cfg["testbed"], len(xs)), board.free, board.board, board.set_quota, profile)
    out["local"] = [{"total_ms": t, "class_index": c} for t, c in zip(cal["local_ms"], board.top1, strict=True)]
    print(json.dumps({"calibration": cal, **out}), flush=True)
    with eventloop.Loop() as loop:  # one loop for every job (eventloop.Loop says why)
        for line in sys.stdin:
            job = json.loads(line)
            if job.get("quit"):
                break
            try:
                print(json.dumps(_answer(loaded, xs, job, cfg["cgroup"], gap_s, board, cal, loop)), flush=True)
            except Exception as e:
                print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    return 0


def _answer(loaded: LoadedModel, xs: list[torch.Tensor], job: dict[str, Any], cgroup: str, gap_s: float,
            board: Board, cal: dict[str, Any], loop: eventloop.Loop) -> dict[str, Any]:
    """One job of the runner's: heads to time, the local passes again (``recheck``), the local strategy's frames in a
    round (``local``), or another strategy's frames."""
    if "time_heads" in job:
        return {"heads": time_heads(loaded, xs, job["time_heads"], job["runs"], gap_s, job.get("budget_s"))}
    if job.get("recheck"):
        return {"recheck": calibration.recheck(cal, board.free, board.board, len(xs))}
    if job.get("local"):  # the local strategy's frames in a round (runtime.measure.scenarios.run.time_rounds)
        return board.local(job.get("frames_from", 0), job.get("frames_to", len(xs)), job.get("warmup", 1))
    # the agent's own loop (uvloop where installed, as `edgesplit agent` runs it)
    return loop.run(run_split(loaded, {**job, "cgroup": cgroup}, xs))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
