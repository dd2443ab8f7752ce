"""A model's spec and the image preprocessing that feeds it: shared by the registry and the
bundled models that need it (:mod:`runtime.models.digits`), so imports go one way
(registry -> digits -> spec, registry -> spec). :mod:`runtime.models.registry` re-exports all of it.

Normalisation convention: ``mean``/``std`` apply to pixel values in [0, 255]:
``(x - mean) / std``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from runtime.contracts.errors import InvalidInput

if TYPE_CHECKING:
    from PIL import Image

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGE_FORMATS = ("PNG", "JPEG")  # the only formats load_image opens (Pillow knows dozens, some through other programs)
# Pixels of an image load_image decodes (read from its header first): 40 M (a 7,300 x 5,500 photo, 120 MB as RGB).
# A small PNG can declare far more (130 KB for 7,000 x 7,000, 147 MB decoded); Pillow only warns from 89 M.
MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model and feed it images."""

    name: str                          # id used on the wire, e.g. "vgg16" or "mynet:build"
    factory: Callable[[], nn.Module]   # builds the model with its weights; deterministic
    input_size: tuple[int, int]        # (H, W) the model expects
    mean: tuple[float, float, float]   # per-channel normalisation of [0, 255] pixels: (x - mean) / std
    std: tuple[float, float, float]
    labels: tuple[str, ...] | None     # class names, or None
    weights: str                       # human description of the weights
    description: str = ""


def load_image(data: bytes | Path) -> Image.Image:
    """Decode a PNG/JPEG from bytes or a path to an RGB PIL image; InvalidInput when it is not one."""
    import io

    from PIL import Image, UnidentifiedImageError

    what = "the data" if isinstance(data, (bytes, bytearray)) else str(data)
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data, formats=IMAGE_FORMATS)
    except UnidentifiedImageError as e:  # its message names an in-memory buffer object: no use to a caller
        raise InvalidInput(f"{what} is not a PNG or JPEG image; send a PNG or JPEG") from e
    except Exception as e:
        raise InvalidInput(f"could not read the image ({type(e).__name__}: {e}); send a PNG or JPEG") from e
    width, height = img.size  # from the header: nothing decoded yet
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise InvalidInput(f"{what} is {width} x {height} = {width * height:,} pixels; at most {MAX_IMAGE_PIXELS:,} are "
                           "decoded: scale it down (the model sees a few hundred pixels a side)")
    try:
        img.load()
    except Exception as e:
        raise InvalidInput(f"could not decode the image ({type(e).__name__}: {e}); send a PNG or JPEG") from e
    return img.convert("RGB")


def preprocess(spec: ModelSpec, image: Image.Image) -> torch.Tensor:
    """A PIL image as the model's input: float32 tensor of shape (1, 3, H, W).

    RGB conversion; bilinear resize so the short side is ``round(H * 256 / 224)``; centre crop
    to ``spec.input_size``; ``(pixel - mean) / std`` with pixels in [0, 255]. The tensor keeps the
    8-bit pixels it was made from (:func:`source_pixels`).
    """
    return normalise(spec, image_pixels(spec, image))


def image_pixels(spec: ModelSpec, image: Image.Image) -> np.ndarray:
    """The 8-bit RGB pixels :func:`preprocess` normalises: resized and centre-cropped, uint8 (H, W, 3), read-only."""
    from PIL import Image

    h, w = spec.input_size
    img = image.convert("RGB")
    short = round(h * 256 / 224)
    iw, ih = img.size
    if iw <= ih:
        nw, nh = short, max(1, round(ih * short / iw))
    else:
        nw, nh = max(1, round(iw * short / ih)), short
    if (nw, nh) != (iw, ih):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    # Centre crop (pad with black if the crop is larger than the image, as torchvision does).
    left = round((nw - w) / 2.0)
    top = round((nh - h) / 2.0)
    img = img.crop((left, top, left + w, top + h))
    pixels = np.frombuffer(bytearray(img.tobytes()), dtype=np.uint8).reshape(h, w, 3)
    pixels.flags.writeable = False  # nobody else holds them: the tensor normalise makes keeps them without a copy
    return pixels


def normalise(spec: ModelSpec, pixels: np.ndarray) -> torch.Tensor:
    """``(pixel - mean) / std`` of uint8 (H, W, 3) ``pixels`` as (1, 3, H, W) float32, holding the pixels
    (:func:`source_pixels`; made read-only: the tensor's input codecs send them as they are)."""
    h, w = spec.input_size
    if pixels.shape != (h, w, 3) or pixels.dtype != np.uint8:
        raise InvalidInput(f"{spec.name} takes uint8 pixels of shape ({h}, {w}, 3), got {pixels.dtype} {pixels.shape}")
    x = torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32))  # a copy: the tensor shares no pixel
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    x = ((x - mean) / std).unsqueeze(0).contiguous()
    if not x.is_inference():  # an inference tensor has no version counter to check them against
        kept = pixels if not pixels.flags.writeable else pixels.copy()
        kept.flags.writeable = False
        _hold(x, kept)
    return x


# The source pixels of the tensors normalise made and holds, by id(tensor): (a weak reference to the tensor, its
# pixels, its version counter then). Issue 14: an input codec sends a frame's pixels as they are, instead of
# de-normalising, rounding and transposing the tensor back to them (1.0 ms of a MobileNetV2 webp frame's board thread,
# the same bytes). Beside the tensor, not on it: a tensor's attributes would be pickled with it (torch.save, and
# torch.load's weights_only refuses a numpy array). The entry goes when the tensor does (the reference's callback).
_HELD: dict[int, tuple[weakref.ref[torch.Tensor], np.ndarray, int]] = {}


def _hold(x: torch.Tensor, pixels: np.ndarray) -> None:
    key = id(x)
    _HELD[key] = (weakref.ref(x, lambda _ref: _HELD.pop(key, None)), pixels, x._version)


def source_pixels(x: torch.Tensor) -> np.ndarray | None:
    """The uint8 (H, W, 3) pixels ``x`` was made from by :func:`preprocess`, or None: for any other tensor (an
    operation's result, a copy, a slice) and for one changed in place since (its version counter moved)."""
    held = _HELD.get(id(x))
    if held is None or held[0]() is not x or x._version != held[2]:
        return None
    return held[1]
