"""Fidelity and cost of a Transfer Layer on hold-out crops.

Fidelity compares the split model with the TL (head -> encoder -> decoder -> tail) against the
unsplit model on the same inputs: relative feature MSE at the split (MSE / variance of the
feature), top-1 agreement and the mean KL(p_full || p_tl) of the softmax outputs.
Cost: bytes per frame on the wire (TL + int8+lz4, TL + raw fp32, raw fp32 and int8+lz4 without
the TL) and median encode / decode milliseconds with one torch thread at batch 1.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from runtime.codec import get_codec
from runtime.models.loader import LoadedModel
from runtime.models.slicing import SplitPoint
from runtime.transfer import data as tl_data
from runtime.transfer.layers import TransferLayer

CHUNK = 16


def tail_of(tl: TransferLayer, loaded: LoadedModel, split: SplitPoint) -> torch.nn.Module:
    """The tail the edge runs after this TL: its fine-tuned copy, or the model's own."""
    tail = getattr(tl, "tail", None)
    return tail if tail is not None else loaded.tail(split.name)


@torch.no_grad()
def features_and_outputs(loaded: LoadedModel, split: SplitPoint, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Head features at the split and unsplit-model outputs (flattened to (N, K)) for inputs ``x``."""
    head, tail = loaded.head(split.name), loaded.tail(split.name)
    hs, ys = [], []
    for i in range(0, x.shape[0], CHUNK):
        h = head(x[i:i + CHUNK])
        hs.append(h)
        ys.append(tail(h).flatten(1))
    return torch.cat(hs), torch.cat(ys)


@torch.no_grad()
def fidelity(tl: TransferLayer, loaded: LoadedModel, split: SplitPoint, x: torch.Tensor) -> dict:
    h, y = features_and_outputs(loaded, split, x)
    tail = tail_of(tl, loaded, split)
    tl.eval()
    rec, out = [], []
    for i in range(0, h.shape[0], CHUNK):
        r = tl(h[i:i + CHUNK])
        rec.append(r)
        out.append(tail(r).flatten(1))
    r, yt = torch.cat(rec), torch.cat(out)
    var = h.var().clamp_min(1e-12)
    kl = F.kl_div(F.log_softmax(yt, 1), F.log_softmax(y, 1), log_target=True, reduction="batchmean")
    return {
        "images": int(x.shape[0]),
        "feature_rel_mse": float(((r - h) ** 2).mean() / var),
        "top1_agreement": float((yt.argmax(1) == y.argmax(1)).float().mean()),
        "kl_divergence": float(kl),
    }


def median_ms(fn, xs) -> float:
    """Median wall time of ``fn(x)`` over ``xs`` in ms, after one untimed warm-up call."""
    fn(xs[0])
    times = []
    for x in xs:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def costs(tl: TransferLayer, h: torch.Tensor, codec: str = "int8+lz4") -> dict:
    """Bytes per frame and encode/decode ms (1 thread, batch 1, median) over the features ``h``."""
    enc = get_codec(codec)
    frames = [h[i:i + 1] for i in range(h.shape[0])]
    zs = [tl.encoder(f) for f in frames]
    raw_split = 4 * math.prod(h.shape[1:])
    tl_codec = statistics.mean(len(enc.encode(z).buffer) for z in zs)
    no_tl_codec = statistics.mean(len(enc.encode(f).buffer) for f in frames)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tl.encoder(frames[0]), tl.decoder(zs[0])  # warm-up
        encode_ms = median_ms(tl.encoder, frames)
        decode_ms = median_ms(tl.decoder, zs)
    finally:
        torch.set_num_threads(threads)
    tl_raw = 4 * math.prod(tl.encoded_shape)
    return {
        "codec": codec,
        f"tl_{codec}": round(tl_codec, 1),
        "tl_raw_fp32": tl_raw,
        "raw_fp32_at_split": raw_split,
        f"{codec}_at_split_without_tl": round(no_tl_codec, 1),
        "reduction_vs_raw_fp32": round(raw_split / tl_codec, 2),
        "encode_ms": round(encode_ms, 3),
        "decode_ms": round(decode_ms, 3),
    }


def evaluate(tl: TransferLayer, loaded: LoadedModel, split: SplitPoint, *, images: int = 32, seed: int = 0,
             data=None, codec: str = "int8+lz4", timing: bool = True) -> dict:
    """Fidelity (and, with ``timing``, bytes and ms) on ``images`` hold-out crops."""
    _, holdout = tl_data.train_holdout(data)
    x = tl_data.holdout_crops(loaded.spec, holdout, images, seed)
    report = {"holdout": f"{images} crops of {', '.join(p.name for p in holdout)} (seed stream {seed}+"
                         f"{tl_data.HOLDOUT_SEED_OFFSET})", "fidelity": fidelity(tl, loaded, split, x)}
    if timing:
        h, _ = features_and_outputs(loaded, split, x)
        report["bytes_per_frame"] = costs(tl, h, codec)
    return report
