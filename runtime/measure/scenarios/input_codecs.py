"""Ways to send the model's input image, measured unrestricted and on the emulated board in one run: bytes per
frame and encode time of the wire's input codecs (pixels, pixels+lz4, webp, jpeg, fp16+lz4; the input ones both
from the frame's source pixels, as the agent sends them, and from the tensor) and of Pillow's PNG (the lossless
alternative to pixels+lz4 that was not built), on the bundled photos.

    python -m runtime.measure.scenarios.input_codecs [--model efficientnet_lite0] [--quota-us 5000] [--repeats 5]

The board is this process under a cgroup v1 CPU quota (``--quota-us`` per ``--period-us``, one torch thread), as
``edgesplit bench-scenarios`` makes it; the cgroup is removed on exit. Needs root and cgroup v1 ``cpu``; without
them only the unrestricted column is measured (and the output says so). Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
import uuid

import torch

WIRE = ("pixels", "pixels+lz4", "webp", "jpeg", "fp16+lz4")
PNG_LEVELS = (1, 6)


def _png(spec, level: int):
    from PIL import Image

    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)

    def enc(x: torch.Tensor) -> int:
        pix = (x[0] * std + mean).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        buf = io.BytesIO()
        Image.fromarray(pix).save(buf, format="PNG", compress_level=level)
        return len(buf.getvalue())
    return enc


def encoders(spec, xs: list) -> dict:
    """Per name, a frame's encoder returning its bytes. The wire's input codecs send a frame's source pixels as they
    are (runtime.models.spec.source_pixels, as the agent does); "(from the tensor)" is the same codec on a copy of
    the frame that holds no pixels, de-normalised back to them (any other tensor's path): same bytes."""
    from runtime.wire.codec import get_codec, wire_bytes
    from runtime.wire.pixels import is_input_codec

    bare = {id(x): x.clone() for x in xs}  # a clone holds no pixels
    out = {}
    for name in WIRE:
        codec = get_codec(name, spec=spec)
        out[name] = lambda x, c=codec: wire_bytes(c.encode(x))
        if is_input_codec(name):
            out[f"{name} (from the tensor)"] = lambda x, c=codec: wire_bytes(c.encode(bare[id(x)]))
    for level in PNG_LEVELS:
        out[f"png (level {level})"] = _png(spec, level)
    return out


def measure(encs: dict, xs: list, repeats: int) -> dict:
    """Per encoder: median encode ms over ``repeats`` passes of ``xs`` (one untimed pass first) and median bytes."""
    res = {}
    for name, enc in encs.items():
        sizes = [enc(x) for x in xs]
        times = []
        for _ in range(repeats):
            for x in xs:
                t = time.perf_counter()
                enc(x)
                times.append(time.perf_counter() - t)
        res[name] = {"encode_ms": statistics.median(times) * 1e3, "bytes": statistics.median(sizes),
                     "bytes_range": [min(sizes), max(sizes)]}
    return res


def main(argv: list[str] | None = None) -> int:
    from runtime.agent.sources import open_source
    from runtime.daemon.cgroup import ROOT, CpuQuota, unavailable
    from runtime.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--quota-us", type=int, default=5000, help="the board's cfs quota (default: %(default)s)")
    p.add_argument("--period-us", type=int, default=50_000, help="cfs period (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the 4 photos (default: %(default)s)")
    args = p.parse_args(argv)
    if not 1 <= args.repeats <= 100 or not 1000 <= args.quota_us <= args.period_us <= 1_000_000:
        p.error("--repeats 1..100; 1000 <= --quota-us <= --period-us <= 1000000")
    torch.set_num_threads(1)
    spec = load_model(args.model).spec
    xs = [f.tensor for f in open_source(spec, "samples", 4)]
    encs = encoders(spec, xs)
    free = measure(encs, xs, args.repeats)
    board, why = None, unavailable()
    if not why:
        quota = CpuQuota(f"edgesplit-input-codecs-{uuid.uuid4().hex[:8]}", args.period_us, args.quota_us)
        try:
            (quota.path / "cgroup.procs").write_text(str(os.getpid()))
            board = measure(encs, xs, args.repeats)
        finally:
            (ROOT / "cgroup.procs").write_text(str(os.getpid()))
            quota.remove()
    print(f"{args.model}, 4 bundled photos, 1 torch thread; board: "
          + (f"cfs quota {args.quota_us}/{args.period_us} us" if board else f"not measured ({why})"))
    print("\n| input codec | bytes/frame (median; range) | encode ms unrestricted | encode ms board | board / unrestricted |")
    print("|---|---:|---:|---:|---:|")
    for name, f in free.items():
        b = board[name]["encode_ms"] if board else float("nan")
        print(f"| {name} | {f['bytes']:,.0f} ({f['bytes_range'][0]:,}-{f['bytes_range'][1]:,}) | "
              f"{f['encode_ms']:.2f} | {b:.1f} | {b / f['encode_ms']:.1f}x |")
    print(json.dumps({"model": args.model, "quota_us": args.quota_us, "period_us": args.period_us,
                      "unrestricted": free, "board": board}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
