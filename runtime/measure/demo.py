"""``edgesplit demo``: an edge worker and a device agent on loopback, on a bundled default."""

from __future__ import annotations

import argparse
import asyncio
import sys

from runtime.agent.client import FrameResult
from runtime.agent.config import AgentConfig
from runtime.agent.run import run_agent
from runtime.worker.process import spawn_worker


def _line(r: FrameResult, labels: tuple[str, ...] | None) -> str:
    j = r.to_json(labels)
    label = j["label"] if j["label"] is not None else f"class {j['class_index']}"
    where = j["where"] if not r.fallback_reason else f"local ({r.fallback_reason})"
    return (f"frame {j['seq']:>3}  {j['frame']:<16} {label:<22} {j['score']:.3f}  {where:<6} "
            f"{r.times['total'] * 1e3:7.1f} ms  {r.wire_bytes:>8,} B")


def _choose_tl(args: argparse.Namespace) -> tuple[str, str]:
    """(TL manifest path or "", codec): ``--tl bundled`` is the TL shipped for the model, if any,
    and ``--codec auto`` is ``ans`` with a transform TL, else int8+lz4."""
    tl = "" if args.tl in ("", "none") else args.tl
    if tl == "bundled":
        from runtime.transfer.artifact import bundled_tl

        path = bundled_tl(args.model)
        tl = str(path) if path is not None and not args.split else ""
        if path is not None and args.split:
            print("--split given: running without the bundled Transfer Layer (it is for its own split)",
                  file=sys.stderr)
    codec = args.codec
    if codec == "auto":
        kind = ""
        if tl:
            from runtime.transfer.artifact import read_manifest, resolve_path

            kind = read_manifest(resolve_path(tl))["kind"]
        codec = "ans" if kind == "transform" else "int8+lz4"
    return tl, codec


def run_demo(args: argparse.Namespace) -> int:
    tl, codec = _choose_tl(args)
    print("starting an edge worker on 127.0.0.1 ...", file=sys.stderr, flush=True)
    tl_flags = ["--tl", tl] if tl else []
    worker = spawn_worker(["--torch-threads", "1", "--metrics-port", "-1", *tl_flags])
    try:
        print(f"worker SERVING on {worker.address}; streaming {args.frames} frames of {args.model} with codec "
              f"{codec}{' through Transfer Layer ' + tl if tl else ''}", file=sys.stderr, flush=True)
        config = AgentConfig(worker=worker.address, model=args.model, split=args.split, codec=codec,
                             source=args.source, frames=args.frames, window=2, torch_threads=1, tl=tl)
        results = asyncio.run(run_agent(config, out=sys.stdout, fmt=_line))
    finally:
        code = worker.stop()
        print(f"worker drained and exited with code {code}", file=sys.stderr)
    return 0 if results and all(r.where == "edge" for r in results) else 1
