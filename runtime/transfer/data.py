"""Unlabelled training and hold-out images for Transfer Layers: seeded augmented crops.

Training never needs labels (it distils the unsplit model), so any photos do. By default they
are the bundled samples (``runtime/models/samples/*.jpg``), divided by file so the hold-out
crops come from photos training never saw:

* training: every sample except the last in sorted order (cameraman, cat, coffee);
* hold-out: the last (rocket.jpg), as seeded random crops with a seed stream of their own.

A user folder (``data=DIR``) is divided the same way: every 4th image (sorted) is held out, at
least one. With a single image both sets use it (documented in the report's ``data`` field).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from runtime.agent.sources import IMAGE_SUFFIXES, SAMPLES_DIR, load_image
from runtime.errors import InvalidInput
from runtime.models.registry import ModelSpec

HOLDOUT_SEED_OFFSET = 1_000_003  # hold-out crops draw from a different seed stream


def image_paths(data: str | Path | Sequence[str | Path] | None = None) -> list[Path]:
    """The images named by ``data``: None (the bundled samples), a folder, or a list of files."""
    if data is None or data == "" or data == "samples":
        folder: Path | None = SAMPLES_DIR
    elif isinstance(data, (str, Path)):
        folder = Path(data)
        if folder.is_file():
            return [folder]
        if not folder.is_dir():
            raise InvalidInput(f"training data {str(data)!r} is neither a folder of PNG/JPEG images nor an image")
    else:
        return [Path(p) for p in data]
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InvalidInput(f"no PNG or JPEG images in {folder}")
    return paths


def split_holdout(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(training, hold-out) by file: every 4th sorted image is held out (at least the last one)."""
    paths = sorted(paths)
    if len(paths) == 1:
        return list(paths), list(paths)
    held = [p for i, p in enumerate(paths) if i % 4 == 3] or [paths[-1]]
    return [p for p in paths if p not in held], held


def describe(train: Sequence[Path], holdout: Sequence[Path]) -> str:
    return (f"random resized crops (scale 0.25-1, aspect 3/4-4/3, h-flip) of {', '.join(p.name for p in train)}; "
            f"hold-out crops of {', '.join(p.name for p in holdout)}")


def _normalise(spec: ModelSpec, img: Image.Image) -> torch.Tensor:
    h, w = spec.input_size
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).reshape(h, w, 3).permute(2, 0, 1).float()
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def _random_resized_crop(img: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """torchvision-style RandomResizedCrop (scale 0.25-1, log-uniform aspect 3/4-4/3) + h-flip."""
    iw, ih = img.size
    area = iw * ih
    for _ in range(10):
        target = area * rng.uniform(0.25, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
        if 0 < cw <= iw and 0 < ch <= ih:
            left, top = int(rng.integers(0, iw - cw + 1)), int(rng.integers(0, ih - ch + 1))
            break
    else:  # fall back to a centre crop of the whole short side
        cw = ch = min(iw, ih)
        left, top = (iw - cw) // 2, (ih - ch) // 2
    h, w = size
    out = img.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def augmented_crops(spec: ModelSpec, paths: Sequence[str | Path], n: int, seed: int) -> torch.Tensor:
    """``n`` seeded augmented crops of ``paths`` (cycled in order) as model inputs ``(n, 3, H, W)``.

    Deterministic: the same (paths, n, seed) gives the same tensor in every process.
    """
    if not paths:
        raise InvalidInput("no images to crop")
    images = [load_image(Path(p)) for p in paths]
    rng = np.random.default_rng(seed)
    out = torch.empty((n, 3, *spec.input_size), dtype=torch.float32)
    for i in range(n):
        out[i] = _normalise(spec, _random_resized_crop(images[i % len(images)], rng, spec.input_size))
    return out


def holdout_crops(spec: ModelSpec, paths: Sequence[str | Path], n: int, seed: int = 0) -> torch.Tensor:
    """Hold-out crops: same augmentation, a seed stream disjoint from training's."""
    return augmented_crops(spec, paths, n, seed + HOLDOUT_SEED_OFFSET)
