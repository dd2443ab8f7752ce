"""Frame sources for the device agent: bundled samples, synthetic, image folders, video."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from runtime.contracts.errors import InvalidInput
from runtime.models import ModelSpec, preprocess
from runtime.models.registry import IMAGE_SUFFIXES, SAMPLES_DIR, load_image

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm"}
SYNTHETIC_FRAMES = 100


@dataclass
class Frame:
    name: str  # where it came from, e.g. "chelsea.jpg" or "synthetic-7"
    tensor: torch.Tensor  # preprocessed input, shape (1, 3, H, W)


def _images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InvalidInput(f"no PNG or JPEG images in {folder}")
    return files


def _folder(spec: ModelSpec, folder: Path) -> Iterator[Frame]:
    for path in _images(folder):
        yield Frame(path.name, preprocess(spec, load_image(path)))


def _synthetic(spec: ModelSpec, seed: int = 0) -> Iterator[Frame]:
    rng = np.random.default_rng(seed)
    h, w = spec.input_size
    for i in itertools.count():
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        yield Frame(f"synthetic-{i}", preprocess(spec, Image.fromarray(pixels)))


def _video(spec: ModelSpec, path: Path) -> Iterator[Frame]:
    try:
        import cv2  # optional extra: pip install 'edgesplit[video]'
    except ImportError:
        raise InvalidInput(f"reading {path} needs OpenCV: pip install 'edgesplit[video]'") from None
    cap = cv2.VideoCapture(str(path) if not str(path).isdigit() else int(str(path)))
    if not cap.isOpened():
        raise InvalidInput(f"could not open video {path}")
    try:
        for i in itertools.count():
            ok, bgr = cap.read()
            if not ok:
                return
            yield Frame(f"{Path(str(path)).name}#{i}", preprocess(spec, Image.fromarray(bgr[:, :, ::-1].copy())))
    finally:
        cap.release()


def open_source(spec: ModelSpec, source: str, frames: int = 0) -> Iterator[Frame]:
    """Frames from ``source``; ``frames`` > 0 takes that many, repeating a finite source."""
    if source == "samples":
        make = lambda: _folder(spec, SAMPLES_DIR)  # noqa: E731
    elif source == "synthetic":
        make = lambda: _synthetic(spec)  # noqa: E731
        frames = frames or SYNTHETIC_FRAMES
    else:
        path = Path(source)
        if path.is_dir():
            _images(path)  # fail now, not at the first frame
            make = lambda: _folder(spec, path)  # noqa: E731
        elif path.suffix.lower() in VIDEO_SUFFIXES or source.startswith("/dev/video") or source.isdigit():
            make = lambda: _video(spec, path)  # noqa: E731
        else:
            raise InvalidInput(
                f"unknown source {source!r}: use 'samples', 'synthetic', a folder of PNG/JPEG images or a video file"
            )
    if frames <= 0:
        return make()
    return itertools.islice(_repeat(make), frames)


def _repeat(make) -> Iterator[Frame]:
    while True:
        n = 0
        for frame in make():
            n += 1
            yield frame
        if n == 0:
            return
