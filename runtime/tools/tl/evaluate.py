"""Fidelity and cost of a Transfer Layer on hold-out crops.

Fidelity compares the split model with the TL (head -> encoder -> decoder -> tail) against the
unsplit model on the same inputs: relative feature MSE at the split (MSE / variance of the
feature), top-1 agreement and the mean KL(p_full || p_tl) of the softmax outputs; ``with_codec``
repeats agreement and KL with the wire codec between encoder and decoder, frame by frame as on
the wire. On a labelled hold-out (``--data digits``) ``accuracy`` gives top-1 accuracy against
the labels of the unsplit model, of split + TL and of split + TL + codec, and the drop in
percentage points.
Cost: bytes per frame on the wire (TL + int8+lz4, TL + raw fp32, raw fp32 and int8+lz4 without
the TL) and median encode / decode milliseconds with one torch thread at batch 1.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F

from runtime.models.loader import LoadedModel
from runtime.models.slicing import SplitPoint
from runtime.tools.tl import data as tl_data
from runtime.transfer.layers import TransferLayer
from runtime.wire.codec import MODEL_CODECS, get_codec

if TYPE_CHECKING:
    from runtime.wire.codec_base import Codec
    from runtime.wire.entropy import EntropyModel

T = TypeVar("T")
Stage = Callable[[torch.Tensor], torch.Tensor]  # a TL's encoder or decoder, a model's tail

logger = logging.getLogger(__name__)

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


def _agreement_kl(yt: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    kl = F.kl_div(F.log_softmax(yt, 1), F.log_softmax(y, 1), log_target=True, reduction="batchmean")
    return {"top1_agreement": float((yt.argmax(1) == y.argmax(1)).float().mean()), "kl_divergence": float(kl)}


@torch.no_grad()
def tl_outputs(tl: TransferLayer, loaded: LoadedModel, split: SplitPoint,
               h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructed features and outputs (N, K) of head features ``h`` through the TL and its tail."""
    tail = tail_of(tl, loaded, split)
    tl.eval()
    rec, out = [], []
    for i in range(0, h.shape[0], CHUNK):
        r = tl(h[i:i + CHUNK])
        rec.append(r)
        out.append(tail(r).flatten(1))
    return torch.cat(rec), torch.cat(out)


@torch.no_grad()
def codec_outputs(encoder: Stage, decoder: Stage, tail: Stage, codec: str, h: torch.Tensor,
                  model: EntropyModel | None = None) -> tuple[torch.Tensor, list[int]]:
    """Outputs (N, K) with ``codec`` on the wire, frame by frame (batch 1, as sent): head features
    ``h`` -> encoder -> codec encode -> codec decode -> decoder -> tail; and each frame's serialized
    ``Tensor`` message size in bytes. ``model``: the TL's entropy model (codec ``ans``)."""
    enc = get_codec(codec, model=model)
    sizes, rec = [], []
    for i in range(h.shape[0]):
        msg = enc.encode(encoder(h[i:i + 1]))
        sizes.append(msg.ByteSize())
        rec.append(enc.decode(msg))
    z = torch.cat(rec)
    return torch.cat([tail(decoder(z[i:i + CHUNK])).flatten(1) for i in range(0, z.shape[0], CHUNK)]), sizes


@torch.no_grad()
def fidelity(tl: TransferLayer, loaded: LoadedModel, split: SplitPoint, x: torch.Tensor,
             features: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Fidelity without a codec on inputs ``x`` (``features``: their precomputed head features and
    unsplit outputs, see :func:`features_and_outputs`)."""
    h, y = features if features is not None else features_and_outputs(loaded, split, x)
    r, yt = tl_outputs(tl, loaded, split, h)
    var = h.var().clamp_min(1e-12)
    return {"images": int(x.shape[0]), "feature_rel_mse": float(((r - h) ** 2).mean() / var), **_agreement_kl(yt, y)}


def top1_accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return int((outputs.argmax(1) == labels).sum()) / len(labels)


def median_ms(fn: Callable[[T], object], xs: Sequence[T]) -> float:
    """Median wall time of ``fn(x)`` over ``xs`` in ms, after one untimed warm-up call."""
    fn(xs[0])
    times = []
    for x in xs:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def costs(tl: TransferLayer, h: torch.Tensor, codec: str = "int8+lz4") -> dict[str, Any]:
    """Bytes per frame and encode/decode ms (1 thread, batch 1, median) over the features ``h``.
    Without the TL, codec ``ans`` (which needs the TL) is compared with int8+lz4."""
    enc = get_codec(codec, model=tl.entropy_model)
    plain = enc if codec not in MODEL_CODECS else get_codec("int8+lz4")
    frames = [h[i:i + 1] for i in range(h.shape[0])]
    zs = [tl.encoder(f) for f in frames]
    raw_split = 4 * math.prod(h.shape[1:])
    tl_codec = statistics.mean(len(enc.encode(z).buffer) for z in zs)
    no_tl_codec = statistics.mean(len(plain.encode(f).buffer) for f in frames)
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
        f"{plain.name}_at_split_without_tl": round(no_tl_codec, 1),
        "reduction_vs_raw_fp32": round(raw_split / tl_codec, 2),
        "encode_ms": round(encode_ms, 3),
        "decode_ms": round(decode_ms, 3),
        **_codec_ms(enc, zs),
    }


def refine_figures(yc: torch.Tensor, y: torch.Tensor, margin: float) -> dict[str, float]:
    """What the agent's ``refine_margin`` would deliver: results ``yc`` (after TL and codec) whose
    top-1 softmax margin is below ``margin`` are replaced by the exact ``y`` (the board re-runs the
    tail on the raw head output). Returns the refined share and the delivered agreement."""
    top = F.softmax(yc, 1).topk(2, 1).values if yc.shape[1] > 1 else torch.ones(yc.shape[0], 2)
    low = (top[:, 0] - top[:, 1]) < margin
    agree = (yc.argmax(1) == y.argmax(1)) | low
    return {"margin": margin, "refined_share": float(low.float().mean()), "top1_agreement": float(agree.float().mean())}


def _codec_ms(enc: Codec, zs: Sequence[torch.Tensor]) -> dict[str, float]:
    """Median ms of the wire codec's encode and decode of the TL's output (1 thread, batch 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        msgs = [enc.encode(z) for z in zs]
        return {"codec_encode_ms": round(median_ms(enc.encode, zs), 3),
                "codec_decode_ms": round(median_ms(lambda m: enc.decode(m), msgs), 3)}
    finally:
        torch.set_num_threads(threads)


def default_codec(tl: TransferLayer) -> str:
    """The wire codec a TL is measured and served with by default: ``ans`` for a transform TL."""
    return "ans" if tl.kind == "transform" else "int8+lz4"


@torch.no_grad()
def evaluate(tl: TransferLayer, loaded: LoadedModel, split: SplitPoint, *, images: int = 32, seed: int = 0,
             data: tl_data.Data = None, codec: str | None = None, timing: bool = True,
             refine_margin: float = 0.0) -> dict[str, Any]:
    """Fidelity (without and with ``codec``), accuracy on a labelled hold-out and, with ``timing``,
    bytes and ms, on ``images`` hold-out images.

    ``accuracy`` is present only when the hold-out has labels and the model has as many outputs as
    the labels have classes: ``{"images", "unsplit", "split_tl", "split_tl_codec", "codec",
    "drop_pp"}`` (drop = unsplit - split + TL + codec, in percentage points).
    """
    codec = codec or default_codec(tl)
    get_codec(codec, model=tl.entropy_model)  # unknown codec -> InvalidInput before any work
    _, holdout = tl_data.train_holdout(data)
    x = tl_data.holdout_crops(loaded.spec, holdout, images, seed)
    labels = tl_data.holdout_labels(loaded.spec, holdout, images)
    h, y = features_and_outputs(loaded, split, x)
    fid = fidelity(tl, loaded, split, x, features=(h, y))
    yc, _ = codec_outputs(tl.encoder, tl.decoder, tail_of(tl, loaded, split), codec, h, model=tl.entropy_model)
    fid["with_codec"] = {"codec": codec, **_agreement_kl(yc, y)}
    if refine_margin > 0:
        fid["with_codec"]["refine"] = refine_figures(yc, y, refine_margin)
    report = {"holdout": tl_data.holdout_description(holdout, images, seed), "fidelity": fid}
    if labels is not None and y.shape[1] != tl_data.DIGITS_CLASSES:
        logger.warning("%s has %d outputs, not the hold-out's %d classes: no accuracy", loaded.name, y.shape[1],
                       tl_data.DIGITS_CLASSES)
    elif labels is not None:
        _, yt = tl_outputs(tl, loaded, split, h)
        unsplit, with_codec = top1_accuracy(y, labels), top1_accuracy(yc, labels)
        report["accuracy"] = {"images": int(labels.numel()), "unsplit": unsplit, "split_tl": top1_accuracy(yt, labels),
                              "split_tl_codec": with_codec, "codec": codec,
                              "drop_pp": round(100 * (unsplit - with_codec), 2)}
    if timing:
        report["bytes_per_frame"] = costs(tl, h, codec)
    return report
