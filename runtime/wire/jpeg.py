"""``jpeg``: the model's input image sent as a camera would send it, at split point 0 (``input``) only.

The agent holds the preprocessed input, ``(pixel - mean) / std`` of shape ``[1, 3, H, W]``
(:func:`runtime.models.spec.preprocess`). Encoding undoes the normalisation with the model's own
``mean``/``std``, rounds and clips to uint8 RGB (or takes the pixels the input was made from,
:class:`runtime.wire.codec_base.InputImageCodec`) and writes a baseline JPEG with Pillow at a quality
(``jpeg`` = 90, ``jpegQ`` for a quality Q in 1..100, e.g. ``jpeg75``; Pillow's default 4:2:0 chroma
subsampling). The worker decodes it with Pillow and normalises it with the mean/std of the model the
frame names. Lossy: on the four bundled photos at quality 90 (224 x 224) the decoded pixels differ from
the originals by 0.007-0.49 pixel units on average (tests/test_jpeg.py bounds the mean absolute error at
1), 7.7-16.7 KB a frame against 43-150 KB for int8+lz4 of the same tensor.

Decoding checks before anything is allocated: the header (:func:`validate_tensor`: compression none,
shape ``[1, 3, H, W]``, ``0 < encoded_size <= 4 * numel``, the buffer that long), the model's input
size, then the JPEG's own header (format JPEG, RGB or greyscale, ``W x H`` equal to the declared
shape) before the pixels are decoded; a truncated or corrupt stream is :class:`InvalidInput`.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

import numpy as np
import torch

from runtime.contracts.errors import InvalidInput, PreconditionFailed
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.codec_base import InputImageCodec, Payload

if TYPE_CHECKING:
    from runtime.models.spec import ModelSpec

DEFAULT_QUALITY = 90
INPUT_SPLIT = "input"  # the one split point a JPEG may cross: index 0
_NAME = re.compile(r"jpeg(\d{1,3})?")
# codecs of the input image: split 0 only
INPUT_IMAGE_CODECS = (tensor_pb2.CODEC_JPEG, tensor_pb2.CODEC_PIXELS, tensor_pb2.CODEC_WEBP)


def jpeg_quality(name: str) -> int | None:
    """The quality a codec name asks for (``jpeg`` = 90, ``jpeg75`` = 75); None when it is no JPEG name."""
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        return None
    q = int(m.group(1)) if m.group(1) else DEFAULT_QUALITY
    if not 1 <= q <= 100:
        raise InvalidInput(f"codec {name!r}: JPEG quality must be 1..100 (e.g. jpeg, jpeg90, jpeg75)")
    return q


def is_jpeg(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_split(codec: object, split_index: int, split_name: str = "") -> None:
    """Refuse an input-image codec (jpeg, pixels) anywhere but the input split (a feature tensor is no image)."""
    if getattr(codec, "codec", None) in INPUT_IMAGE_CODECS and split_index != 0:
        name = getattr(codec, "name", "jpeg")
        where = f"{split_index}{f' ({split_name!r})' if split_name else ''}"
        raise InvalidInput(f"codec {name} sends the input image and works only at split 0 ({INPUT_SPLIT!r}), not at "
                           f"split {where}; use raw, fp16(+lz4) or int8(+lz4) there")


class JpegCodec(InputImageCodec):
    """JPEG of the de-normalised input image; ``spec`` gives mean/std and the input size."""

    name = "jpeg"
    lossless = False
    codec = tensor_pb2.CODEC_JPEG
    nominal_ratio = 40.0  # a guess before measuring: camera photos at quality 90 (fp32 bytes / JPEG bytes)

    def __init__(self, spec: ModelSpec, quality: int = DEFAULT_QUALITY) -> None:
        super().__init__(spec)
        self.quality = quality
        self.name = "jpeg" if quality == DEFAULT_QUALITY else f"jpeg{quality}"

    def _encode_pixels(self, pixels: np.ndarray) -> memoryview:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=self.quality)
        return memoryview(buf.getvalue())

    def _decode_values(self, payload: Payload, msg: tensor_pb2.Tensor) -> torch.Tensor:
        from PIL import Image

        shape = list(msg.shape)
        self._check_shape(shape)
        h, w = shape[2], shape[3]
        try:
            img = Image.open(io.BytesIO(payload), formats=["JPEG"])  # reads the header only
        except Exception as e:
            raise InvalidInput(f"the CODEC_JPEG buffer is not a JPEG ({type(e).__name__})") from None
        if img.size != (w, h) or img.mode not in ("RGB", "L"):
            raise InvalidInput(f"the JPEG is {img.size[0]}x{img.size[1]} {img.mode}; the tensor declares "
                               f"{w}x{h} RGB (shape {shape})")
        try:
            img.load()
        except Exception as e:  # truncated or corrupt scan data
            raise InvalidInput(f"the JPEG could not be decoded ({type(e).__name__}: {e})") from None
        data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
        return self._from_pixels(data.reshape(h, w, 3).permute(2, 0, 1).to(torch.float32))


def jpeg_codec(name: str, spec: ModelSpec | None) -> JpegCodec:
    """The JPEG codec ``name`` for ``spec``'s model (its mean/std and input size)."""
    q = jpeg_quality(name)
    if q is None:
        raise InvalidInput(f"{name!r} is not a JPEG codec name (jpeg, jpeg90, jpeg75, ...)")
    if spec is None:
        raise PreconditionFailed(f"codec {name!r} de-normalises the input image with the model's mean/std: "
                                 "it needs the model (spec) and works only at split 0 ('input')")
    return JpegCodec(spec, q)
