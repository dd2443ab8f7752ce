"""``edgesplit bench-scenarios``: edgesplit against local, edge-only, Scission and ScissionLite on
emulated IIoT links, the board under a cgroup CPU quota (runtime/measure/scenarios). The CLI layer
hands the planner's search to the runner as its ranking (the runtime does not import the planner)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from runtime.cli.common import Subparsers
    from runtime.contracts.costmodel import Configuration, Link
    from runtime.contracts.profile import Profile
    from runtime.models.spec import ModelSpec
    from runtime.tools.tl.data import Source

QUICK: dict[str, Any] = {"models": ["resnet18"], "scenarios": ["20mbit"], "frames": 3, "warmup": 1, "profile_runs": 2, "profile_inputs": 2,
         "fidelity_frames": 16, "head_runs": 3, "head_budget_s": 20.0, "rounds": 2}
FIDELITY_SEED = 14  # the fidelity frames' crops: the same frames in every run


def add_parser(sub: Subparsers) -> None:
    from runtime.measure.scenarios.spec import SCENARIOS

    p = sub.add_parser("bench-scenarios", help="headline benchmark: strategies x emulated links, board under a CPU quota "
                                               "(needs root and cgroup v1 cpu)")
    p.add_argument("--model", action="append", help="model(s) (default: efficientnet_lite0); repeatable")
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                   help="link scenario(s) (default: the static ones; 'dynamic' adds the trace: " + "; ".join(f"{k} = {v.source}" for k, v in SCENARIOS.items()) + ")")
    p.add_argument("--frames", type=int, default=20, help="timed frames per strategy (default: 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed frames per strategy and round (default: 2)")
    p.add_argument("--rounds", type=int, default=4,
                   help="the timed frames in this many rounds of consecutive frames, the strategies in turn, their order "
                        "reversed each round, so a burst of other work on a shared machine lands on several strategies "
                        "(1..20; 1: each strategy's frames in one block; default: %(default)s)")
    p.add_argument("--profile-runs", type=int, default=5, help="timed passes per block when profiling (default: 5)")
    p.add_argument("--head-runs", type=int, default=10,
                   help="board head pricing: whole passes timed cut by cut, and frames per picked head timed on its own "
                        "(1..100; default: %(default)s)")
    p.add_argument("--head-candidates", type=int, default=3,
                   help="before the first plans, time on the board each strategy's best N heads per link by the "
                        "whole-pass prior, not only the heads the plans pick (0..10; 0: picked only; default: %(default)s)")
    p.add_argument("--head-budget-s", type=float, default=120.0,
                   help="board seconds at most for those candidate heads, best first; the rest stay on the prior "
                        "(1..3600; default: %(default)s)")
    p.add_argument("--plan-trial-frames", type=int, default=8,
                   help="before each static link's rounds, edgesplit's best plans within --plan-trial-margin of its "
                        "best's prediction (3 at most), and local when within it too, run this many frames each through "
                        "the real agent, worker and relay; edgesplit runs the one measured fastest, local included "
                        "(Scission and ScissionLite keep their cost models' plans; 0..50, 0: off; default: %(default)s)")
    p.add_argument("--plan-trial-margin", type=float, default=0.25,
                   help="a plan (or local) joins the trial when the best's predicted gain over it is within this "
                        "fraction (0..0.9; default: %(default)s, the headline's measured prediction errors)")
    p.add_argument("--plan-trial-budget-s", type=float, default=60.0,
                   help="predicted board seconds at most for a link's trial, best first; the rest are not run "
                        "(1..3600; default: %(default)s)")
    p.add_argument("--slowdown", type=float, default=18.0, help="board / edge compute ratio to calibrate the quota to (default: 18)")
    p.add_argument("--cgroup-period-us", type=int, default=50_000,
                   help="cfs period of the board's quota; the kernel's smallest quota is 1 ms, so the period bounds the "
                        "slowdown a busy machine can reach (default: %(default)s)")
    p.add_argument("--window", type=int, default=4, help="frames in flight in each strategy's pipelined pass (1: skip it; default: 4)")
    p.add_argument("--pipeline-frames", type=int, default=0, help="frames of the pipelined pass (default: as --frames)")
    p.add_argument("--min-fidelity", type=float, default=0.99,
                   help="edgesplit's floor for its plan's top-1 agreement with the unsplit model, measured on "
                        "--fidelity-frames frames before the plan runs (default: %(default)s, one point)")
    p.add_argument("--fidelity-frames", type=int, default=200,
                   help="frames of that check and of every strategy's offline fidelity: seeded random crops of "
                        "scikit-image's 16 photos when installed, else of the bundled photos (default: %(default)s)")
    p.add_argument("--out", default="runtime/measure/results", help="folder for JSON, markdown, PNG (default: %(default)s)")
    p.add_argument("--name", default="scenarios", help="file stem of the results (default: %(default)s)")
    p.add_argument("--merge", action="append", metavar="JSON",
                   help="run nothing: merge these results files (e.g. one run per model) into --out/--name "
                        "(.json, .md, .png); repeatable")
    p.add_argument("--quick", action="store_true", help="CI mode (< 3 min): resnet18, 20mbit, 3 frames, 2 profile runs")
    p.set_defaults(func=cmd_bench_scenarios)


def _rank(dev: Profile, edge: Profile, link: Link, min_fidelity: float) -> Configuration | None:
    from planner.search import search
    from runtime.contracts.costmodel import Constraints, Network, Tier

    # the board need not run a block: cut 0 sends the input (raw for Scission, jpeg for edgesplit)
    ranked = search([Tier("device", (dev,)), Tier("edge", (edge,))],
                    Network({("device", "edge"): link}), Constraints(min_fidelity=min_fidelity), top_n=1)
    return ranked[0] if ranked else None


def _fidelity_frames(model_spec: ModelSpec, n: int) -> tuple[torch.Tensor, str]:
    """``n`` seeded random resized crops (scale 0.25-1, h-flip) of scikit-image's photos, or of the bundled ones."""
    from runtime.contracts.errors import InvalidInput
    from runtime.tools.tl.data import augmented_crops, image_paths, skimage_images

    photos: Sequence[Source]
    try:
        train, held = skimage_images()
        photos, what = [*train, *held], "scikit-image's 16 bundled photos"
    except InvalidInput:
        photos, what = image_paths(None), "the 4 bundled photos (scikit-image is not installed)"
    return augmented_crops(model_spec, photos, n, FIDELITY_SEED), f"{n} seeded random crops of {what}"


def _merge(paths: list[str], out: str, name: str) -> int:
    import json
    from pathlib import Path

    from runtime.measure.scenarios import report

    try:
        parts = [json.loads(Path(p).read_text()) for p in paths]
    except (OSError, ValueError) as e:
        print(f"error: cannot read a results file: {e}", file=sys.stderr)
        return 2
    for p in report.write(report.merge(parts), out, name):
        print(p)
    return 0


def cmd_bench_scenarios(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from runtime.measure.scenarios import report
    from runtime.measure.scenarios.run import run
    from runtime.measure.scenarios.spec import RunSpec, Testbed

    if args.merge:
        return _merge(args.merge, args.out, args.name)
    if args.window < 1 or args.pipeline_frames < 0 or args.frames < 1 or not 1 <= args.fidelity_frames <= 10_000:
        print("error: --window and --frames must be >= 1, --pipeline-frames >= 0, --fidelity-frames 1..10000",
              file=sys.stderr)
        return 2
    if not 1 <= args.rounds <= 20:
        print(f"error: --rounds must be 1..20, not {args.rounds}", file=sys.stderr)
        return 2
    if not 1 <= args.head_runs <= 100:
        print(f"error: --head-runs must be 1..100, not {args.head_runs}", file=sys.stderr)
        return 2
    if not 0 <= args.head_candidates <= 10 or not 1 <= args.head_budget_s <= 3600:
        print(f"error: --head-candidates must be 0..10 and --head-budget-s 1..3600, not {args.head_candidates} and "
              f"{args.head_budget_s:g}", file=sys.stderr)
        return 2
    if not 0 <= args.plan_trial_frames <= 50 or not 0 <= args.plan_trial_margin <= 0.9 \
            or not 1 <= args.plan_trial_budget_s <= 3600:
        print(f"error: --plan-trial-frames must be 0..50, --plan-trial-margin 0..0.9 and --plan-trial-budget-s "
              f"1..3600, not {args.plan_trial_frames}, {args.plan_trial_margin:g} and {args.plan_trial_budget_s:g}",
              file=sys.stderr)
        return 2
    if not 10_000 <= args.cgroup_period_us <= 1_000_000:
        print(f"error: --cgroup-period-us must be 10000..1000000 (cgroup v1 allows 1 ms..1 s; under 10 ms the 1 ms "
              f"minimum quota caps the slowdown at 10x), not {args.cgroup_period_us}", file=sys.stderr)
        return 2
    spec = RunSpec(models=tuple(args.model or ["efficientnet_lite0"]), scenarios=tuple(args.scenario or RunSpec().scenarios),
                   frames=args.frames, warmup=args.warmup, rounds=args.rounds, profile_runs=args.profile_runs, head_runs=args.head_runs,
                   head_candidates=args.head_candidates, head_budget_s=args.head_budget_s, min_fidelity=args.min_fidelity,
                   fidelity_frames=args.fidelity_frames, plan_trial_frames=args.plan_trial_frames,
                   plan_trial_margin=args.plan_trial_margin, plan_trial_budget_s=args.plan_trial_budget_s,
                   testbed=Testbed(target_slowdown=args.slowdown, period_us=args.cgroup_period_us), out_dir=args.out,
                   name=args.name, window=args.window, pipeline_frames=args.pipeline_frames,
                   command="edgesplit " + " ".join(sys.argv[1:]))
    if args.quick:
        quick: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in QUICK.items()}
        spec = replace(spec, **quick)
    def write(res: dict[str, Any]) -> list[Path]:
        res["machine"] = report.machine()
        return report.write(res, spec.out_dir, args.name)

    res = run(spec, _rank, lambda msg: print(f"... {msg}", file=sys.stderr, flush=True), partial=write,
              frames=_fidelity_frames)
    for p in write(res):
        print(p)
    return 0
