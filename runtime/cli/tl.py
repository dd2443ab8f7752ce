"""``edgesplit tl train|eval|list|sweep``: train, measure, list and compare Transfer Layers."""

from __future__ import annotations

import argparse
import json
import shlex
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers
    from runtime.transfer.layers import TransferLayer


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from runtime.models.loader import load_model
    from runtime.tools.tl.evaluate import evaluate
    from runtime.tools.tl.train import train_tl
    from runtime.transfer.artifact import save_tl

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    split = loaded.split(args.split)
    t0 = time.perf_counter()
    tl, report = train_tl(loaded, split, args.kind, args.ratio, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, seed=args.seed, data=args.data or None, finetune_tail=args.finetune_tail,
                          progress=not args.no_progress, holdout_images=args.holdout_images,
                          pool_size=args.pool_size, kl_weight=args.kl_weight, init=args.init,
                          step=args.step)
    seconds = time.perf_counter() - t0
    costs = evaluate(tl, loaded, split, images=min(args.holdout_images, 8), seed=args.seed,
                     data=args.data or None)["bytes_per_frame"]
    tl_id, path = save_tl(tl, loaded, split, args.out, fidelity=report["fidelity"], bytes_per_frame=costs,
                          training=report["training"])
    fid = report["fidelity"]
    print(f"{tl_id} {path}")
    training = report["training"]
    if training["loss_first"] is None:  # a transform TL is fitted in closed form: no gradient steps, no loss
        fitted = training.get("transform")
        how = (f"fitted on {fitted['features']} pooled features (step {fitted['step_abs']:.4g} abs)" if fitted
               else "no parameters trained")
    else:
        how = f"loss {training['loss_first']} -> {training['loss_last']}"
    print(f"trained {args.kind} {_size_label(tl)} for {loaded.name}@{split.name} {list(split.out_shape)} -> "
          f"{[1, *tl.encoded_shape]} in {seconds:.1f} s; {how}; hold-out: top-1 agreement {fid['top1_agreement']:.3f}, "
          f"KL {fid['kl_divergence']:.4f}, feature rel. MSE {fid['feature_rel_mse']:.4f}; "
          f"{costs['tl_' + costs['codec']]:,.0f} B/frame with {costs['codec']}")
    return 0


def _size_label(tl: TransferLayer, manifest: dict[str, Any] | None = None) -> str:
    """``x16`` for a bottleneck; ``step 1 (2.07 abs)`` for a transform TL."""
    if tl.kind == "transform":
        rel = getattr(tl, "step_setting", None)
        if rel is None and manifest:
            rel = ((manifest.get("training") or {}).get("transform") or {}).get("step")
        return (f"step {rel:g} " if isinstance(rel, (int, float)) else "step ") + f"({tl.encoder.get_buffer('step')[0].item():.4g} abs)"
    return f"x{tl.ratio}"


def cmd_eval(args: argparse.Namespace) -> int:
    import sys

    import torch

    from runtime.tools.tl import data as tl_data
    from runtime.tools.tl.evaluate import evaluate
    from runtime.transfer.artifact import load_tl, record_measurements

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    art = load_tl(args.tl)
    data = args.data or None
    images = args.images or tl_data.default_holdout_images(data)
    report = evaluate(art.tl, art.model, art.split, images=images, seed=args.seed, data=data,
                      codec=args.codec or None, refine_margin=args.refine_margin)
    report = {"tl_id": art.tl_id, "model": art.model.name, "split": art.split.name, "kind": art.tl.kind,
              "ratio": art.tl.ratio, "input_shape": list(art.split.out_shape),
              "encoded_shape": list(art.encoded_shape), **report, "recorded": None}
    if args.record:
        fidelity = {**report["fidelity"], "holdout": report["holdout"], "measured_by": "edgesplit tl eval",
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if "accuracy" in report:
            fidelity["accuracy"] = report["accuracy"]
        try:
            record_measurements(art.path, fidelity=fidelity, bytes_per_frame=report["bytes_per_frame"])
            report["recorded"] = str(art.path)
        except OSError as e:
            print(f"edgesplit: warning: figures not written to {art.path}: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    f, b = report["fidelity"], report["bytes_per_frame"]
    c = b["codec"]
    print(f"{art.tl_id}: {art.tl.kind} {_size_label(art.tl, art.manifest)} for {art.model.name}@{art.split.name} "
          f"{report['input_shape']} -> {report['encoded_shape']}")
    print(f"hold-out: {report['holdout']}")
    print(f"top-1 agreement with the unsplit model  {f['top1_agreement']:.3f}")
    print(f"  ... with {c:<29}{f['with_codec']['top1_agreement']:.3f}")
    if "refine" in f["with_codec"]:
        rf = f["with_codec"]["refine"]
        print(f"  ... refining margin < {rf['margin']:<18g}{rf['top1_agreement']:.3f}  "
              f"({100 * rf['refined_share']:.1f} % of frames re-run their tail on the board)")
    print(f"KL(unsplit || TL)                       {f['kl_divergence']:.5f}")
    print(f"  ... with {c:<29}{f['with_codec']['kl_divergence']:.5f}")
    print(f"feature relative MSE at the split       {f['feature_rel_mse']:.5f}")
    if "accuracy" in report:
        a = report["accuracy"]
        print(f"top-1 accuracy (labels), unsplit        {a['unsplit']:.4f}")
        print(f"top-1 accuracy, split + TL              {a['split_tl']:.4f}")
        print(f"top-1 accuracy, split + TL + {c:<11}{a['split_tl_codec']:.4f}  (drop {a['drop_pp']:.2f} pp)")
    print(f"bytes/frame TL + {c:<22} {b['tl_' + c]:>10,.0f}")
    print(f"bytes/frame TL + raw fp32               {b['tl_raw_fp32']:>10,}")
    print(f"bytes/frame raw fp32 at split, no TL    {b['raw_fp32_at_split']:>10,}")
    plain = "int8+lz4" if c == "ans" else c
    print(f"bytes/frame {plain} at split, no TL     {b[plain + '_at_split_without_tl']:>10,.0f}")
    print("  (bytes/frame: the tensor's payload; a frame on the wire adds its header, as edgesplit bench's counts)")
    print(f"encode ms (board, 1 thread, median)     {b['encode_ms']:>10.3f}")
    print(f"decode ms (edge, 1 thread, median)      {b['decode_ms']:>10.3f}")
    print(f"codec {c} encode / decode ms           {b['codec_encode_ms']:>7.3f} / {b['codec_decode_ms']:.3f}")
    if report["recorded"]:
        print(f"figures written to {report['recorded']} (fidelity, bytes_per_frame)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from runtime.transfer.artifact import list_tls

    rows = list_tls(args.dir)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no Transfer Layers in {args.dir}")
        return 0
    print(f"{'id':<17}{'model':<20}{'split':<18}{'kind':<12}{'ratio':>5}  {'top-1':>6}  {'KL':>8}  {'B/frame':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['tl_id']:<17}unreadable: {r['error']}")
            continue
        f, b = r.get("fidelity", {}), r.get("bytes_per_frame", {})
        bytes_ = b.get("tl_" + b.get("codec", ""), "")
        print(f"{r['tl_id']:<17}{r['model']:<20}{r['split']:<18}{r['kind']:<12}{r['ratio']:>5}  "
              f"{f.get('top1_agreement', float('nan')):>6.3f}  {f.get('kl_divergence', float('nan')):>8.4f}  "
              f"{bytes_:>9}")
    return 0


def sweep_command(args: argparse.Namespace) -> str:
    """The ``edgesplit tl sweep`` command line that reproduces ``args`` (written atop the table)."""
    parts = ["edgesplit", "tl", "sweep", "--model", args.model]
    parts += [a for s in args.split for a in ("--split", s)]
    parts += [a for k in args.kind or ["reference", "bottleneck"] for a in ("--kind", k)]
    kinds = args.kind or ["reference", "bottleneck"]
    if "bottleneck" in kinds:
        parts += [a for r in args.ratio or [8, 16, 32] for a in ("--ratio", str(r))]
    if "transform" in (args.kind or []):
        parts += [a for q in args.step or [0.5, 1.0, 2.0] for a in ("--step", f"{q:g}")]
    if args.codec:
        parts += [a for c in args.codec for a in ("--codec", c)]
    trains = "bottleneck" in kinds
    if trains:
        parts += ["--steps", str(args.steps)]
    for flag, value, default, used in (("--batch-size", args.batch_size, 16, trains), ("--lr", args.lr, 1e-3, trains),
                                       ("--pool-size", args.pool_size, 256, True),
                                       ("--kl-weight", args.kl_weight, 1.0, trains),
                                       ("--init", getattr(args, "init", "random"), "random", trains)):
        if used and value != default:
            parts += [flag, str(value)]
    parts += ["--images", str(args.images), "--seed", str(args.seed)]
    if args.data:
        parts += ["--data", args.data]
    if args.threads > 0:
        parts += ["--threads", str(args.threads)]
    for flag, value in (("--out", args.out), ("--table", args.table), ("--plot", args.plot)):
        if value:
            parts += [flag, value]
    return shlex.join(parts)


def cmd_sweep(args: argparse.Namespace) -> int:
    import torch

    from runtime.tools.tl.sweep import CODECS, sweep, write_plot, write_table

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.plot:  # fail before the (long) sweep when matplotlib is missing
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from runtime.contracts.errors import InvalidInput

            raise InvalidInput("--plot needs matplotlib: pip install 'edgesplit[train]'") from None
    result = sweep(args.model, args.split, kinds=args.kind or ["reference", "bottleneck"],
                   ratios=args.ratio or [8, 16, 32], codecs=args.codec or CODECS, steps=args.steps,
                   quant_steps=args.step or [0.5, 1.0, 2.0],
                   batch_size=args.batch_size, lr=args.lr, pool_size=args.pool_size, kl_weight=args.kl_weight,
                   init=args.init, data=args.data or None, images=args.images, seed=args.seed, out=args.out or None,
                   progress=not args.no_progress)
    command = sweep_command(args)
    if args.table:
        write_table(result, args.table, command)
    if args.plot:
        write_plot(result, args.plot)
    acc = result.get("accuracy")
    print(f"{'split':<24}{'TL':<11}{'ratio':>5}  {'codec':<10}{'B/frame':>10}  {'top-1':>6}  {'KL':>8}  {'enc %':>6}"
          + (f"  {'acc.':>6}  {'drop pp':>7}" if acc is not None else ""))
    for r in result["rows"]:
        size = f"q{r['step']:g}" if r.get("step") is not None else (r["ratio"] or "")
        print(f"{r['split']:<24}{'no TL' if r['kind'] == 'none' else r['kind']:<11}{size:>5}  "
              f"{r['codec']:<10}{r['bytes']:>10,.0f}  {r['top1']:>6.3f}  {r['kl']:>8.4f}  "
              f"{100 * r['encode_ms'] / r['head_ms']:>6.1f}"
              + (f"  {r['accuracy']:>6.3f}  {100 * (acc - r['accuracy']):>7.1f}" if acc is not None else ""))
    if acc is not None:
        print(f"unsplit top-1 accuracy on the labelled hold-out: {acc:.4f}")
    print(f"{len(result['rows'])} rows in {result['seconds']:.0f} s"
          + (f"; table {args.table}" if args.table else "") + (f"; plot {args.plot}" if args.plot else ""))
    return 0


def add_parser(sub: Subparsers) -> None:
    """The ``tl`` command group, added to ``edgesplit``'s subparsers."""
    p = sub.add_parser("tl", help="Transfer Layers: train, evaluate and list TL artifacts")
    tsub = p.add_subparsers(dest="tl_command", required=True)
    _add_train(tsub)
    _add_eval(tsub)
    _add_list(tsub)
    _add_sweep(tsub)


def _add_train(tsub: Subparsers) -> None:
    from runtime.transfer.kinds import KINDS, RATIOS

    t = tsub.add_parser("train", help="train a TL by distillation from the unsplit model and save it")
    t.add_argument("--model", required=True, help="bundled model or path/to/file.py:factory")
    t.add_argument("--split", required=True, help="split point index or name")
    t.add_argument("--kind", choices=KINDS, default="bottleneck", help="TL kind (default: bottleneck)")
    t.add_argument("--ratio", type=int, choices=RATIOS, default=None,
                   help="values in / values out (bottleneck default 16; reference is always 4; transform 1)")
    t.add_argument("--step", type=float, default=1.0,
                   help="transform TL: quantisation step in channel standard deviations; larger is fewer bytes, "
                   "lower fidelity (default: 1.0)")
    t.add_argument("--steps", type=int, default=200, help="optimiser steps (default: 200)")
    t.add_argument("--batch-size", type=int, default=16, help="crops per step (default: 16)")
    t.add_argument("--pool-size", type=int, default=256,
                   help="training images whose features are computed once and drawn from (default: 256)")
    t.add_argument("--kl-weight", type=float, default=1.0, help="weight of the distillation KL term (default: 1)")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    t.add_argument("--seed", type=int, default=0, help="seed for weights, crops and batches (default: 0)")
    t.add_argument("--finetune-tail", action="store_true", help="also train the tail (stored in the artifact)")
    t.add_argument("--init", choices=("random", "pca"), default="random",
                   help="bottleneck start: random weights, or the closed-form PCA code of the training pool's "
                   "features (with --steps 0 a pure PCA TL) (default: random)")
    t.add_argument("--data", default="", help="folder of PNG/JPEG for crops, \"skimage\" (scikit-image's "
                   "photos) or \"digits\" (MNIST training digits; both need edgesplit[train]); default: the "
                   "bundled samples")
    t.add_argument("--holdout-images", type=int, default=16, help="hold-out crops measured after training")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--out", required=True, help="directory for <tl_id>.safetensors and <tl_id>.json")
    t.set_defaults(func=cmd_train)


def _add_eval(tsub: Subparsers) -> None:
    e = tsub.add_parser("eval", help="fidelity, bytes per frame and encode/decode time on hold-out crops")
    e.add_argument("--tl", required=True, help="the artifact's .json (or .safetensors) path, or a bundled TL's id "
                   "(tl-d1a2152e9a29: EfficientNet-Lite0 split 45, transform)")
    e.add_argument("--images", type=int, default=0,
                   help="hold-out images (default: 32 crops; with --data digits all 1,000 labelled test digits)")
    e.add_argument("--seed", type=int, default=0, help="hold-out crop seed (default: 0)")
    e.add_argument("--data", default="", help="image folder, \"skimage\", or \"digits\" (labelled MNIST test "
                   "digits: adds top-1 accuracy; needs edgesplit[train]) (default: the bundled samples; held-out "
                   "files only)")
    e.add_argument("--codec", default="", help="wire codec between TL encoder and decoder (default: ans for a "
                   "transform TL, else int8+lz4)")
    e.add_argument("--refine-margin", type=float, default=0.0,
                   help="also report the agreement an agent with --refine-margin M delivers (ambiguous edge results "
                   "re-run on the board) and the share of frames that costs (default: 0, off)")
    e.add_argument("--record", action=argparse.BooleanOptionalAction, default=False,
                   help="write the figures back into the manifest's fidelity and bytes_per_frame (default: off, "
                   "so an eval on fewer or other images never replaces the figures an artifact ships with)")
    e.add_argument("--threads", type=int, default=0, help="torch threads for fidelity (timings always use 1)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=cmd_eval)


def _add_list(tsub: Subparsers) -> None:
    ls = tsub.add_parser("list", help="TL artifacts in a directory")
    ls.add_argument("dir", help="directory written by 'edgesplit tl train --out'")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)


def _add_sweep(tsub: Subparsers) -> None:
    from runtime.transfer.kinds import KINDS, RATIOS

    sw = tsub.add_parser("sweep", help="bytes per frame vs fidelity for no TL / reference / bottleneck x codecs")
    sw.add_argument("--model", required=True, help="bundled model or path/to/file.py:factory")
    sw.add_argument("--split", action="append", required=True, help="split point index or name (repeatable)")
    sw.add_argument("--kind", action="append", choices=KINDS, help="TL kinds (repeatable; default: both)")
    sw.add_argument("--ratio", action="append", type=int, choices=RATIOS,
                    help="bottleneck ratios (repeatable; default: 8, 16, 32)")
    sw.add_argument("--step", action="append", type=float,
                    help="transform TL quantisation steps (repeatable; default: 0.5, 1, 2)")
    sw.add_argument("--codec", action="append", help="wire codecs (repeatable; default: raw, fp16, int8+lz4; "
                    "transform TLs also get ans)")
    sw.add_argument("--steps", type=int, default=150, help="training steps per bottleneck TL (default: 150)")
    sw.add_argument("--batch-size", type=int, default=16, help="training batch (default: 16)")
    sw.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    sw.add_argument("--pool-size", type=int, default=256, help="training pool of images (default: 256)")
    sw.add_argument("--kl-weight", type=float, default=1.0, help="weight of the distillation KL term (default: 1)")
    sw.add_argument("--init", choices=("random", "pca"), default="random",
                    help="bottleneck start: random or closed-form PCA (default: random)")
    sw.add_argument("--images", type=int, default=64, help="hold-out crops per row (default: 64)")
    sw.add_argument("--seed", type=int, default=0, help="seed for training and hold-out crops (default: 0)")
    sw.add_argument("--data", default="", help="image folder, \"skimage\", or \"digits\" (labelled: adds "
                   "accuracy columns) (default: the bundled samples)")
    sw.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default; timings use 1)")
    sw.add_argument("--out", default="", help="directory for the trained TL artifacts (default: not saved)")
    sw.add_argument("--table", default="", help="markdown table to write")
    sw.add_argument("--plot", default="", help="PNG plot to write (needs matplotlib)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bars")
    sw.set_defaults(func=cmd_sweep)
