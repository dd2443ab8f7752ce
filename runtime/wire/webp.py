"""``webp``: the model's input image as a lossless WebP (VP8L), at split point 0 (``input``) only.

Like ``pixels`` (:mod:`runtime.wire.pixels`), encoding undoes the normalisation with the model's own ``mean``/``std``
and rounds to uint8 RGB, so the decoded tensor equals the agent's bit for bit for an input made from 8-bit pixels
(every frame source; its input holds those pixels and they are sent as they are, :class:`InputImageCodec`); the pixels then go out as a lossless WebP written by Pillow at its fastest effort (method 0,
quality 0). On the four bundled photos (224 x 224) that is 33-68 KB a frame (median 49 KB) against 47-149 KB
(median 110 KB) for ``pixels+lz4``, for 1.8-2.2 ms of encoding unrestricted against 0.4-0.7 ms; PNG level 1 takes
69 KB and 3.1 ms (``python -m runtime.measure.scenarios.input_codecs --quota-us 3500 --repeats 3``, 2026-12-03 22:59,
load 1.1). On the emulated board a frame's encode after an idle period took 2-3.5 ms; back to back under that quota
48 ms (each crossed a 50 ms period). A link below about 40 Mbit/s gains more from the 60 KB saved than a board
loses encoding; the planner weighs both from the profiles.

Decoding checks before anything is allocated: the header (:func:`validate_tensor`: compression none, shape
``[1, 3, H, W]``, ``0 < encoded_size <= 4 * numel``, the buffer that long), the model's input size, then the WebP's
own header: the simple lossless form (``RIFF....WEBPVP8L``; a lossy or extended WebP is refused, the frame would
not be exact), RGB, ``W x H`` equal to the declared shape, before the pixels are decoded; a truncated or corrupt
stream is :class:`InvalidInput`.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import torch

from runtime.contracts.errors import InvalidInput, PreconditionFailed
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.codec_base import InputImageCodec, Payload

if TYPE_CHECKING:
    from runtime.models.spec import ModelSpec

WEBP_CODECS = ("webp",)
_MAGIC = (b"RIFF", b"WEBPVP8L")  # bytes 0-4 and 8-16 of a simple-format lossless WebP


def is_webp(name: object) -> bool:
    return isinstance(name, str) and name in WEBP_CODECS


class WebpCodec(InputImageCodec):
    """Lossless WebP of the de-normalised input; ``spec`` gives mean/std and the input size."""

    name = "webp"
    lossless = True  # for inputs made from 8-bit pixels (every frame source); others are rounded to a pixel level
    codec = tensor_pb2.CODEC_WEBP
    nominal_ratio = 12.0  # a guess before measuring: fp32 bytes / WebP bytes of camera photos (about 3x on uint8)

    def _encode_pixels(self, pixels: np.ndarray) -> memoryview:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="WEBP", lossless=True, method=0, quality=0, exact=True)
        return memoryview(buf.getvalue())

    def _decode_values(self, payload: Payload, msg: tensor_pb2.Tensor) -> torch.Tensor:
        from PIL import Image

        shape = list(msg.shape)
        self._check_shape(shape)
        h, w = shape[2], shape[3]
        if bytes(payload[:4]) != _MAGIC[0] or bytes(payload[8:16]) != _MAGIC[1]:
            raise InvalidInput("the CODEC_WEBP buffer is not a simple-format lossless WebP (RIFF....WEBPVP8L)")
        try:
            img = Image.open(io.BytesIO(payload), formats=["WEBP"])  # reads the header only
        except Exception as e:
            raise InvalidInput(f"the CODEC_WEBP buffer is not a WebP ({type(e).__name__})") from None
        if img.size != (w, h) or img.mode != "RGB":
            raise InvalidInput(f"the WebP is {img.size[0]}x{img.size[1]} {img.mode}; the tensor declares "
                               f"{w}x{h} RGB (shape {shape})")
        try:
            img.load()
        except Exception as e:  # truncated or corrupt data
            raise InvalidInput(f"the WebP could not be decoded ({type(e).__name__}: {e})") from None
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return self._from_pixels(data.reshape(h, w, 3).permute(2, 0, 1).to(torch.float32))


def webp_codec(name: str, spec: ModelSpec | None) -> WebpCodec:
    """The lossless WebP codec for ``spec``'s model (its mean/std and input size)."""
    if not is_webp(name):
        raise InvalidInput(f"{name!r} is not a WebP codec name ({', '.join(WEBP_CODECS)})")
    if spec is None:
        raise PreconditionFailed(f"codec {name!r} de-normalises the input image with the model's mean/std: "
                                 "it needs the model (spec) and works only at split 0 ('input')")
    return WebpCodec(spec)
