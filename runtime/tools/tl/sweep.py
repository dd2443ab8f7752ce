"""``edgesplit tl sweep``: bytes per frame against fidelity for TL kinds x ratios x wire codecs.

For every split: the split without a TL, the reference TL and a bottleneck TL per ratio (trained
with :func:`runtime.tools.tl.train.train_tl`, saved under ``out``), each with every codec. A row
is measured on the same hold-out crops, frame by frame as on the wire: head -> TL encoder ->
codec encode (``runtime.wire.codec``) -> codec decode -> TL decoder -> tail, so fidelity includes the
codec's error. Bytes per frame is the serialized ``Tensor`` message (payload plus shape, int8
scales and zero points), the mean over the hold-out crops. Top-1 agreement and KL(unsplit || row)
compare against the unsplit model. ``encode_ms`` is the board's extra work per frame (TL encoder
+ codec encode, 1 torch thread, batch 1, median); ``head_ms`` the head itself, measured the same way.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from runtime.contracts.errors import InvalidInput
from runtime.tools.tl import data as tl_data
from runtime.tools.tl.evaluate import Stage, codec_outputs, features_and_outputs, median_ms, tail_of, top1_accuracy
from runtime.transfer.layers import TransferLayer
from runtime.wire.codec import get_codec

if TYPE_CHECKING:
    from runtime.models.loader import LoadedModel
    from runtime.wire.entropy import EntropyModel

CODECS = ("raw", "fp16", "int8+lz4")  # a transform TL is measured with "ans" too
CODEC_LABEL = {"raw": "fp32 (raw)"}
TIMED_FRAMES = 8
COLUMNS = ("split", "TL", "ratio", "codec", "bytes/frame", "x below raw fp32", "top-1 agreement",
           "top-1 loss (pp)", "KL", "board encode ms", "encode % of head")
ACCURACY_COLUMNS = ("top-1 accuracy", "accuracy drop (pp)")  # appended on a labelled hold-out


@torch.no_grad()
def measure(encoder: Stage, decoder: Stage, tail: Stage, codec: str, h: torch.Tensor, y: torch.Tensor,
            labels: torch.Tensor | None = None, model: EntropyModel | None = None) -> dict[str, Any]:
    """One row: every frame of ``h`` through encoder, codec, decoder and ``tail``; vs outputs ``y``
    (and, given ``labels``, top-1 accuracy against them). ``model``: a transform TL's entropy model."""
    enc = get_codec(codec, model=model)
    yt, sizes = codec_outputs(encoder, decoder, tail, codec, h, model=model)
    kl = F.kl_div(F.log_softmax(yt, 1), F.log_softmax(y, 1), log_target=True, reduction="batchmean")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        frames = [h[i:i + 1] for i in range(min(TIMED_FRAMES, h.shape[0]))]
        encode_ms = median_ms(lambda f: enc.encode(encoder(f)), frames)
    finally:
        torch.set_num_threads(threads)
    row: dict[str, Any] = {"codec": codec, "bytes": statistics.mean(sizes), "top1": float((yt.argmax(1) == y.argmax(1)).float().mean()),
           "kl": float(kl), "encode_ms": encode_ms}
    if labels is not None:
        row["accuracy"] = top1_accuracy(yt, labels)
    return row


def _step_of(tl: TransferLayer | None) -> float | None:
    """A transform TL's ``--step`` (in channel standard deviations), else None."""
    if tl is None or tl.kind != "transform":
        return None
    return getattr(tl, "step_setting", None)


def _head_ms(head: Stage, x: torch.Tensor) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return median_ms(head, [x[i:i + 1] for i in range(min(TIMED_FRAMES, x.shape[0]))])
    finally:
        torch.set_num_threads(threads)


def sweep(model: str, splits: Sequence[str], *, kinds: Sequence[str] = ("reference", "bottleneck"),
          ratios: Sequence[int] = (8, 16, 32), codecs: Sequence[str] = CODECS, steps: int = 150,
          batch_size: int = 16, lr: float = 1e-3, pool_size: int = 256, kl_weight: float = 1.0,
          init: str = "random", quant_steps: Sequence[float] = (0.5, 1.0, 2.0), data: tl_data.Data = None, images: int = 64, seed: int = 0,
          out: str | Path | None = None, progress: bool = False, loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Measure every (split, TL, ratio, codec) row; returns ``{"rows", "holdout", "train", "seconds",
    "accuracy", "training"}``. On a labelled hold-out (``data="digits"``) every row has an
    ``accuracy`` and ``result["accuracy"]`` is the unsplit model's; else it is None."""
    from runtime.models.loader import load_model
    from runtime.tools.tl.train import train_tl
    from runtime.transfer.artifact import save_tl

    if images < 1:
        raise InvalidInput(f"--images must be >= 1, got {images}")
    for c in codecs:
        get_codec(c)  # unknown codec -> InvalidInput before any work
    t0 = time.perf_counter()
    loaded = loaded or load_model(model)
    train, holdout = tl_data.train_holdout(data)
    x = tl_data.holdout_crops(loaded.spec, holdout, images, seed)
    labels = tl_data.holdout_labels(loaded.spec, holdout, images)
    unsplit_accuracy = None
    training: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "lr": lr, "pool_size": pool_size, "kl_weight": kl_weight,
                "seed": seed, **({"init": init} if init != "random" else {})}
    rows: list[dict[str, Any]] = []
    for s in splits:
        split = loaded.split(s)
        h, y = features_and_outputs(loaded, split, x)
        if labels is not None and y.shape[1] != tl_data.DIGITS_CLASSES:
            labels = None  # another task's outputs: agreement only
        if labels is not None:
            unsplit_accuracy = top1_accuracy(y, labels)
        head_ms = _head_ms(loaded.head(split.name), x)
        raw_bytes = None
        variants: list[tuple[str, int | None, TransferLayer | None]] = [("none", None, None)]
        if "reference" in kinds:
            variants.append(("reference", 4, TransferLayer("reference", split.out_shape).eval()))
        if "bottleneck" in kinds:
            for r in ratios:
                bottleneck, _ = train_tl(loaded, split, "bottleneck", r, steps=steps, batch_size=batch_size, lr=lr,
                                 seed=seed, data=data, progress=progress, holdout_images=1, pool_size=pool_size,
                                 kl_weight=kl_weight, init=init)
                variants.append(("bottleneck", r, bottleneck))
        if "transform" in kinds:
            for q in quant_steps:
                transform, _ = train_tl(loaded, split, "transform", steps=0, batch_size=batch_size, seed=seed, data=data,
                                 progress=progress, holdout_images=1, pool_size=pool_size, step=q)
                variants.append(("transform", None, transform))
        for kind, ratio, tl in variants:
            tl_rows: list[dict[str, Any]] = []
            entropy = tl.entropy_model if tl is not None else None
            for c in [*codecs, *(["ans"] if entropy is not None and "ans" not in codecs else [])]:
                if tl is None:
                    m = measure(torch.nn.Identity(), torch.nn.Identity(), loaded.tail(split.name), c, h, y, labels)
                else:
                    m = measure(tl.encoder, tl.decoder, tail_of(tl, loaded, split), c, h, y, labels, model=entropy)
                if kind == "none" and c == "raw":
                    raw_bytes = m["bytes"]
                tl_rows.append({"split": split.name, "split_index": split.index, "kind": kind, "ratio": ratio,
                                "step": _step_of(tl), "head_ms": head_ms, **m})
            if tl is not None and (tl.trainable or tl.kind == "transform") and out is not None:
                fid: dict[str, Any] = {"top1_agreement": tl_rows[0]["top1"], "kl_divergence": tl_rows[0]["kl"],
                                       "holdout": tl_data.holdout_description(holdout, images, seed)}
                if labels is not None:
                    fid["accuracy"] = {"images": images, "unsplit": unsplit_accuracy,
                                       "split_tl": tl_rows[0]["accuracy"], "split_tl_codec": tl_rows[-1]["accuracy"],
                                       "codec": tl_rows[-1]["codec"],
                                       "drop_pp": round(100 * (unsplit_accuracy - tl_rows[-1]["accuracy"]), 2)}
                best = tl_rows[-1]
                save_tl(tl, loaded, split, out, fidelity=fid,
                        bytes_per_frame={"codec": best["codec"], f"tl_{best['codec']}": round(best["bytes"], 1)},
                        training={**training, "data": tl_data.describe(train, holdout)})
            rows.extend(tl_rows)
        for row in rows:
            if row["split"] == split.name:
                row["raw_fp32_bytes"] = raw_bytes if raw_bytes is not None else 4 * math.prod(split.out_shape)
    return {"rows": rows, "model": loaded.name, "train": ", ".join(p.name for p in train),
            "holdout": (tl_data.holdout_description(holdout, images, seed) if labels is not None
                        else f"{images} seeded crops of {', '.join(p.name for p in holdout)} (never trained on)"),
            "seconds": time.perf_counter() - t0, "accuracy": unsplit_accuracy, "training": training}


def _fmt_row(r: dict[str, Any], unsplit_accuracy: float | None = None) -> list[str]:
    extra = ([f"{r['accuracy']:.3f}", f"{100 * (unsplit_accuracy - r['accuracy']):.1f}"]
             if unsplit_accuracy is not None else [])
    return [f"{r['split_index']} `{r['split']}`", "no TL" if r["kind"] == "none" else r["kind"],
            (f"step {r['step']:g}" if r.get("step") is not None else "" if r["ratio"] is None else f"{r['ratio']}"),
            CODEC_LABEL.get(r["codec"], r["codec"]),
            f"{r['bytes']:,.0f}", f"{r['raw_fp32_bytes'] / r['bytes']:.1f}", f"{r['top1']:.3f}",
            f"{100 * (1 - r['top1']):.1f}", f"{max(r['kl'], 0.0):.4f}", f"{r['encode_ms']:.3f}",
            f"{100 * r['encode_ms'] / r['head_ms']:.1f}", *extra]


def write_table(result: dict[str, Any], path: str | Path, command: str) -> None:
    """A markdown table of every row, the command that made it at the top."""
    rows = result["rows"]
    acc = result.get("accuracy")
    columns = COLUMNS + (ACCURACY_COLUMNS if acc is not None else ())
    t = result.get("training") or {}
    heads = sorted({(r["split_index"], r["split"], r["head_ms"]) for r in rows})
    lines = [f"# Transfer Layer sweep: {result['model']}", "", "```sh", command, "```", "",
             f"Training images: {result['train']}. Hold-out: {result['holdout']}. "
             f"Sweep time {result['seconds']:.0f} s (training included).", "",
             "Fidelity is measured after the codec (head -> TL encoder -> codec -> TL decoder -> tail) against "
             "the unsplit model; bytes/frame is the whole serialized Tensor message; board encode ms is TL "
             "encoder + codec encode at batch 1 on 1 thread; head ms (same conditions): "
             + "; ".join(f"split {i} {ms:.2f} ms" for i, _, ms in heads) + ".", ""]
    if t and any(r["kind"] == "bottleneck" for r in rows):
        lines += ["Bottleneck training: " + ", ".join(f"{k} {v}" for k, v in t.items()) + ".", ""]
    if acc is not None:
        lines += [f"Labelled hold-out: the unsplit model's top-1 accuracy is {acc:.3f}; \"top-1 accuracy\" is each "
                  "row's against the labels (after the codec) and the drop is in percentage points.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt_row(r, acc)) + " |" for r in rows]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def write_plot(result: dict[str, Any], path: str | Path) -> None:
    """Top-1 agreement against bytes per frame (log x): a panel per split, marker per TL kind,
    colour per codec; bottleneck points are labelled with their ratio."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidInput("--plot needs matplotlib: pip install 'edgesplit[train]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = result["rows"]
    splits = list(dict.fromkeys((r["split_index"], r["split"]) for r in rows))
    markers = {"none": "o", "reference": "s", "bottleneck": "^", "transform": "D"}
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    colours = dict(zip(codecs, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"), strict=False))
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4.2), squeeze=False, sharey=True)
    for ax, (idx, name) in zip(axes[0], splits, strict=False):
        for r in (r for r in rows if r["split"] == name):
            ax.scatter(r["bytes"], r["top1"], marker=markers.get(r["kind"], "x"), color=colours[r["codec"]],
                       s=46, edgecolors="black", linewidths=0.4, zorder=3)
            if r["kind"] == "bottleneck":
                ax.annotate(f"x{r['ratio']}", (r["bytes"], r["top1"]), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
            elif r["kind"] == "transform" and r.get("step") is not None:
                ax.annotate(f"q{r['step']:g}", (r["bytes"], r["top1"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_title(f"{result['model']} split {idx} ({name})", fontsize=9)
        ax.set_xlabel("bytes per frame on the wire (log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("top-1 agreement with the unsplit model")
    handles = [Line2D([], [], ls="", marker=m, color="grey", label="no TL" if k == "none" else f"{k} TL")
               for k, m in markers.items() if any(r["kind"] == k for r in rows)]
    handles += [Line2D([], [], ls="", marker="o", color=colours[c], label=CODEC_LABEL.get(c, c)) for c in codecs]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
