"""Train a Transfer Layer by distillation from the unsplit model (no labels).

The model is frozen. Inputs are seeded augmented crops of unlabelled photos, or with
``data="digits"`` seeded draws of the MNIST training digits, their labels unused (see
:mod:`runtime.tools.tl.data`); their head features ``h`` at the split and the unsplit outputs
``y`` are computed once into a pool (``pool_size`` crops, capped at 512 MiB of features), and
each step draws a seeded batch from it. The loss per batch is

    MSE(dec(enc(h)), h) / Var(h)  +  kl_weight * KL(softmax(y) || softmax(tail(dec(enc(h)))))

(Var over the whole pool; KL is the usual distillation direction, teacher first, batch mean).
With ``finetune_tail`` the tail (a private copy, BatchNorm statistics frozen) trains too and
becomes part of the TL (``tl.tail``). With ``init="pca"`` a bottleneck starts from the closed-form
PCA initialisation of its pool's features (:meth:`TransferLayer.init_pca`; with ``steps=0`` that
is the whole TL: a pure PCA code). Same seed, same data and same thread count give
bit-identical weights; the global RNG state is left as it was.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from runtime.contracts.errors import InvalidInput
from runtime.models.loader import LoadedModel
from runtime.models.slicing import SplitPoint
from runtime.tools.tl import data as tl_data
from runtime.tools.tl.evaluate import fidelity
from runtime.transfer.layers import TransferLayer

logger = logging.getLogger(__name__)

POOL_BYTES = 512 * 2**20
INITS = ("random", "pca")


def _pool(loaded: LoadedModel, split: SplitPoint, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from runtime.tools.tl.evaluate import features_and_outputs

    return features_and_outputs(loaded, split, x)


def train_tl(loaded: LoadedModel, split: SplitPoint | str | int, kind: str, ratio: int | None = None, *,
             steps: int = 200, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
             data: tl_data.Data = None, finetune_tail: bool = False, progress: bool = True,
             kl_weight: float = 1.0, pool_size: int = 256, holdout_images: int = 16,
             init: str = "random", step: float = 1.0) -> tuple[TransferLayer, dict[str, Any]]:
    """Build and train a TL for ``loaded`` at ``split``; returns ``(tl, report)``.

    The report holds the settings, the loss curve (first / last / every step), the wall time and
    the hold-out fidelity (see :func:`runtime.tools.tl.evaluate.fidelity`). A ``transform`` TL is
    fitted in closed form on the pool (``step``: its quantisation step in channel standard
    deviations); only its ``finetune_tail`` trains, for ``steps`` steps.
    """
    if not isinstance(split, SplitPoint):
        split = loaded.split(split)
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value < (0 if name == "steps" else 1):
            raise InvalidInput(f"{name} must be {'>= 0' if name == 'steps' else '>= 1'}, got {value}")
    if not lr > 0:
        raise InvalidInput(f"lr must be > 0, got {lr}")
    if init not in INITS:
        raise InvalidInput(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "pca" and kind != "bottleneck":
        raise InvalidInput(f"--init pca needs --kind bottleneck, not {kind!r}")
    train_paths, holdout_paths = tl_data.train_holdout(data)
    t_start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tl = TransferLayer(kind, split.out_shape, ratio)
        if finetune_tail:
            tail = copy.deepcopy(loaded.tail(split.name))
            tail.requires_grad_(True)
            tl.tail = tail  # registered: its weights become "tail.*" in the artifact
        else:
            tail = loaded.tail(split.name)
        params = [p for p in tl.parameters() if p.requires_grad]
        losses: list[float] = []
        pool = None
        pca = None
        fitted = None
        if kind == "transform":
            pool = _training_pool(loaded, split, train_paths, steps=0, batch_size=batch_size, seed=seed,
                                  pool_size=pool_size)
            fitted = tl.fit_transform(pool[0], step)
            logger.info("transform TL fitted on %d crops: step %.4g (%.3g x channel std)", fitted["features"],
                        fitted["step_abs"], step)
        if init == "pca":
            pool = _training_pool(loaded, split, train_paths, steps=steps, batch_size=batch_size, seed=seed,
                                  pool_size=pool_size)
            pca = tl.init_pca(pool[0])
            logger.info("PCA init: %d components carry %.3f of the channel variance", pca["components"],
                        pca["explained_variance"])
        if steps and not params:
            logger.info("TL kind %r has no parameters: nothing to train", kind)
        if steps and params:
            if pool is None:
                pool = _training_pool(loaded, split, train_paths, steps=steps, batch_size=batch_size, seed=seed,
                                      pool_size=pool_size)
            losses = _fit(tl, tail, params, pool, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                          kl_weight=kl_weight, progress=progress)
        pool_used = 0 if pool is None else int(pool[0].shape[0])
        del pool
    tl.eval()
    train_seconds = time.perf_counter() - t_start
    x = tl_data.holdout_crops(loaded.spec, holdout_paths, holdout_images, seed)
    report = {
        "training": {
            "steps": steps if params else 0, "batch_size": batch_size, "lr": lr, "seed": seed,
            "finetune_tail": bool(finetune_tail), "kl_weight": kl_weight, "init": init,
            **({"pca": pca} if pca is not None else {}),
            **({"transform": fitted} if fitted is not None else {}),
            "pool_size": pool_used,
            "data": tl_data.describe(train_paths, holdout_paths), "seconds": round(train_seconds, 2),
            "loss_first": round(losses[0], 6) if losses else None,
            "loss_last": round(losses[-1], 6) if losses else None,
        },
        "losses": losses,
        "fidelity": {**fidelity(tl, loaded, split, x),
                     "holdout": tl_data.holdout_description(holdout_paths, holdout_images, seed)},
    }
    return tl, report


def _training_pool(loaded: LoadedModel, split: SplitPoint, train_paths: Sequence[tl_data.Source], *, steps: int,
                   batch_size: int, seed: int, pool_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head features and unsplit outputs of the training crops: ``pool_size`` of them, no more than
    ``steps * batch_size`` (all of ``pool_size`` when ``steps`` is 0) nor 512 MiB of features."""
    per_item = 4 * math.prod(split.out_shape[1:])
    n = max(batch_size, min(pool_size, steps * batch_size if steps else pool_size, POOL_BYTES // max(1, per_item)))
    x = tl_data.augmented_crops(loaded.spec, train_paths, n, seed)
    return _pool(loaded, split, x)


def _fit(tl: TransferLayer, tail: torch.nn.Module, params: list[torch.nn.Parameter], pool: tuple[torch.Tensor, torch.Tensor],
         *, steps: int, batch_size: int, lr: float, seed: int, kl_weight: float, progress: bool) -> list[float]:
    feats, teacher = pool
    n = feats.shape[0]
    var = feats.var().clamp_min(1e-12)
    log_teacher = F.log_softmax(teacher, 1)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    tl.train()
    tail.eval()  # BatchNorm statistics stay frozen even when the tail's weights train
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: no bar when stderr is no terminal (a log file, journald, a pipe)
        bar = tqdm(total=steps, desc=f"TL {tl.kind} x{tl.ratio}", unit="step", leave=False, disable=None)
    try:
        for _ in range(steps):
            idx = torch.randint(n, (batch_size,), generator=gen)
            h, lt = feats[idx], log_teacher[idx]
            r = tl(h)
            mse = ((r - h) ** 2).mean() / var
            y = tail(r).flatten(1)
            kl = F.kl_div(F.log_softmax(y, 1), lt, log_target=True, reduction="batchmean")
            loss = mse + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)  # loss.backward(), typed
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", mse=f"{float(mse.detach()):.4f}", kl=f"{float(kl.detach()):.4f}")
    finally:
        if bar is not None:
            bar.close()
    tl.eval()
    if getattr(tl, "tail", None) is not None:
        tl.tail.requires_grad_(False)
    return losses
