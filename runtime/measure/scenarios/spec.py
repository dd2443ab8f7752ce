"""What a scenario run measures: links, strategies, the testbed's settings (pure data)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

STRATEGIES = ("local", "edge-only", "scission", "scissionlite", "edgesplit")
JPEG_QUALITY = 90  # edge-only: the frame as a camera sends it, JPEG at this quality


@dataclass(frozen=True)
class Scenario:
    """One emulated link (the same both ways); with ``steps``, a dynamic trace: the rate steps through them."""

    name: str  # short id used in tables and file names
    mbps: float  # set bandwidth, Mbit/s
    rtt_ms: float  # set round-trip time (the relay holds rtt/2 each way)
    source: str = ""  # where the figures come from
    steps: tuple[tuple[float, float], ...] = ()  # (Mbit/s, seconds) in order; mbps is the first


SCENARIOS = {
    "1.6mbit": Scenario("1.6mbit", 1.6, 66.7, "Scission's IIoT link (slow)"),
    "20mbit": Scenario("20mbit", 20.0, 20.0, "Scission's IIoT link (fast)"),
    "58.8mbit": Scenario("58.8mbit", 58.8, 27.4, "ScissionLite's testbed"),
    # with jpeg at the input, an 18x slower board sends the JPEG from ~0.2 Mbit/s up: 1.6 would not change the
    # plan (a run of 2026-12-03 kept input:jpeg throughout), 0.1 Mbit/s (a frame's JPEG ~1.2 s) makes it local
    "dynamic": Scenario("dynamic", 20.0, 20.0, "20 -> 0.1 -> 20 Mbit/s, 30 s each (an uplink that nearly drops out)",
                        steps=((20.0, 30.0), (0.1, 30.0), (20.0, 30.0))),
}
STATIC = tuple(k for k, v in SCENARIOS.items() if not v.steps)  # the default run


@dataclass(frozen=True)
class Testbed:
    """The emulated board and the edge; one value per field, all stated in the results."""

    target_slowdown: float = 18.0  # device full-model time / worker's (Pi 4 vs i7-6700K in Scission's data)
    # cgroup v1 cfs period. The kernel's smallest quota is 1 ms: at 20 ms that is 5 % of a core, and on a busy
    # machine (the unrestricted side slowed by other jobs too) 18x needed less, so the quota sat at 1 ms and the
    # board reached 15x. 50 ms allows 2 % (100 ms is jittery); a frame spans many periods either way.
    period_us: int = 50_000
    first_quota_us: int = 0  # quota tried first (0: period / target slowdown); then scaled by measured/target
    calibrate_rounds: int = 4  # coarse quota adjustments at most (runtime.measure.scenarios.calibrate)
    calibrate_runs: int = 5  # full-model passes timed per coarse round (and free passes before each round)
    local_rounds: int = 3  # local runs at most (each the run's --frames passes): the quota is re-aimed between them
    tolerance: float = 0.12  # accept a measured slowdown within this fraction of the target
    threads: int = 1  # torch threads on each side (the device's group holds one core's share)

    @property
    def start_quota_us(self) -> int:
        """The quota tried first (the kernel's minimum is 1 ms)."""
        return self.first_quota_us or max(1000, round(self.period_us / self.target_slowdown))


@dataclass(frozen=True)
class RunSpec:
    """One harness run: models x scenarios x strategies on the same frames."""

    models: tuple[str, ...] = ("efficientnet_lite0",)
    scenarios: tuple[str, ...] = STATIC
    frames: int = 20  # timed frames per strategy (the same frames for every strategy)
    warmup: int = 2  # untimed frames per strategy first (in each round)
    # the timed frames in this many rounds of consecutive frames, the strategies in turn, their order reversed each
    # round (A B C, C B A, ...): on a shared machine a burst of other work then lands on several strategies, not on
    # whichever ran its frames in one block (ResNet-50 at 03:20: the same worker tail 99 ms in edgesplit's block,
    # 90 ms in edge-only's); 1: each strategy's frames in one block, as before
    rounds: int = 4
    profile_runs: int = 5  # timed passes per block when profiling (device and edge)
    # photos profiled per block: bytes after lz4 differ up to 3.4x between the four bundled photos
    # (the committed run of 2026-12-03 used 2, and under-predicted lz4'd early cuts)
    profile_inputs: int = 4
    # board head times: whole passes timed cut by cut (the prior of every head), then each picked head on its own,
    # this many frames each (runtime.measure.scenarios.board)
    head_runs: int = 10
    # before the first plans: each strategy's best heads per static link by the prior, timed on the board too
    # (0: only the picked ones), within head_budget_s seconds of the board's time (best first; the rest untimed)
    head_candidates: int = 3
    head_budget_s: float = 120.0
    # edgesplit's plan trial (runtime.measure.scenarios.trial): before each static link's rounds, its best plans within
    # plan_trial_margin of the best's prediction (plan_trial_plans at most) and local when within it too, this many
    # frames each through the real agent, worker and relay; edgesplit runs the one measured fastest (0: off). Bounded
    # by plan_trial_budget_s of predicted board time per link (best first). The margin covers the committed
    # headline's prediction errors (2026-12-04: plans -10.6 .. +13.1 %, local -24 .. +13 %)
    plan_trial_frames: int = 8
    plan_trial_margin: float = 0.25
    plan_trial_budget_s: float = 60.0
    plan_trial_plans: int = 3
    window: int = 4  # pipelined pass: frames in flight
    pipeline_frames: int = 0  # frames of the pipelined pass (0: as many as ``frames``)
    trace_fps: float = 1.0  # dynamic trace: the agent's camera rate (the whole agent runs under the quota)
    trace_deadline_s: float = 3.0  # dynamic trace: the agent's per-frame deadline
    # edgesplit's floor for a plan's top-1 agreement with the unsplit model (TL, lossy codec, JPEG quality),
    # measured on ``fidelity_frames`` frames before the plan runs: 0.99 = at most one point lost
    min_fidelity: float = 0.99
    fidelity_frames: int = 200  # frames of that check (and of every strategy's offline fidelity column)
    # codecs edgesplit may choose from (jpeg = q90, the edge-only camera's; jpegQ, and pixels+lz4 and webp, the
    # lossless 8-bit input image, at the input only), each plan under the fidelity floor
    codecs: tuple[str, ...] = ("raw", "fp16", "int8+lz4", "pixels+lz4", "webp", "jpeg", "jpeg75", "jpeg60", "jpeg50",
                               "jpeg40")
    testbed: Testbed = field(default_factory=Testbed)  # the board and the edge
    out_dir: str = "runtime/measure/results"  # JSON, markdown and PNG go here
    name: str = "scenarios"  # file stem of the results
    command: str = ""  # the command line, recorded with the results


def round_edges(frames: int, rounds: int) -> list[tuple[int, int]]:
    """``frames`` frames as ``rounds`` runs of consecutive frames (fewer when frames are fewer), as even as can be."""
    n = max(1, min(rounds, frames))
    cuts = [round(frames * k / n) for k in range(n + 1)]
    return list(itertools.pairwise(cuts))
