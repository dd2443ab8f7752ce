"""``pixels`` / ``pixels+lz4``: the model's input image as lossless 8-bit RGB, at split point 0 (``input``) only.

Every frame source builds the model's input from 8-bit pixels (:func:`runtime.models.spec.preprocess`:
``(pixel - mean) / std``), so the pixels are the input's exact, smallest lossless form: a quarter of fp32's
bytes before compression. Encoding undoes the normalisation with the model's own ``mean``/``std``, rounds
to uint8 (exact for an input made from 8-bit pixels; any other value is rounded to the nearest pixel
level; an input that holds its source's pixels is sent from them, the same bytes, :class:`InputImageCodec`) and
sends the planes R, G, B in C order, each row minus the row above it modulo 256 (the first row
as is: on photos the residuals compress better, 110 KB against 118 KB for the bundled photos and 55 KB
against 68 KB for resized crops, both with lz4). The worker adds the rows back up and normalises with the
mean/std of the model the frame names, with the same float32 arithmetic as ``preprocess``: the decoded
tensor equals the agent's bit for bit, so the split computes exactly what the unsplit model does.

Why not PNG: on the bundled photos (``python -m runtime.measure.scenarios.input_codecs``, recorded in
runtime/measure/results/overhead.md) Pillow's PNG at level 1 is 69 KB a frame against 110 KB here, but takes
4.0 ms to encode unrestricted against 0.7 ms (98 ms against 1.4 ms under the emulated board's CPU quota; about
72 against 12 ms on a board 18x slower throughout). Its 41 KB pay for that only below about 5 Mbit/s. The second
lossless input codec is a WebP instead (:mod:`runtime.wire.webp`): 49 KB for 1.8 ms, chosen by the benchmark's
planner over this one on 1.6-58.8 Mbit/s links for EfficientNet-Lite0, MobileNetV2 and DenseNet-169 (2026-12-03).

Decoding checks before anything is allocated: the header (:func:`validate_tensor`: shape ``[1, 3, H, W]``,
``encoded_size == 3 * H * W``, the lz4 payload within its bound) and the model's input size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from runtime.contracts.errors import InvalidInput, PreconditionFailed
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.codec_base import InputImageCodec, Payload

if TYPE_CHECKING:
    from runtime.models.spec import ModelSpec

PIXEL_CODECS = ("pixels", "pixels+lz4")


def is_pixels(name: object) -> bool:
    return isinstance(name, str) and name in PIXEL_CODECS


def is_input_codec(name: object) -> bool:
    """A codec that sends the model's input image (jpeg/jpegQ, pixels, pixels+lz4, webp): split 0 only, needs the
    spec."""
    from runtime.wire.jpeg import is_jpeg
    from runtime.wire.webp import is_webp

    return is_jpeg(name) or is_pixels(name) or is_webp(name)


class PixelsCodec(InputImageCodec):
    """Lossless 8-bit pixels of the de-normalised input; ``spec`` gives mean/std and the input size."""

    name = "pixels"
    lossless = True  # for inputs made from 8-bit pixels (every frame source); others are rounded to a pixel level
    codec = tensor_pb2.CODEC_PIXELS
    nominal_ratio = 4.0  # fp32 bytes / uint8 bytes, before lz4

    def __init__(self, spec: ModelSpec, lz4: bool = False) -> None:
        super().__init__(spec, lz4)

    def _encode_pixels(self, pixels: np.ndarray) -> memoryview:
        planes = pixels.transpose(2, 0, 1)  # R, G, B planes (a view)
        res = np.empty(planes.shape, dtype=np.uint8)
        res[:, 0] = planes[:, 0]
        np.subtract(planes[:, 1:], planes[:, :-1], out=res[:, 1:])  # uint8 arithmetic wraps modulo 256
        return res.data.cast("B")

    def _decode_values(self, payload: Payload, msg: tensor_pb2.Tensor) -> torch.Tensor:
        shape = list(msg.shape)
        self._check_shape(shape)
        res = torch.frombuffer(payload, dtype=torch.uint8).reshape(shape[1:])
        return self._from_pixels(torch.cumsum(res, dim=1, dtype=torch.int32).bitwise_and_(255).to(torch.float32))


def pixels_codec(name: str, spec: ModelSpec | None) -> PixelsCodec:
    """The pixel codec ``name`` (``pixels`` or ``pixels+lz4``) for ``spec``'s model."""
    if not is_pixels(name):
        raise InvalidInput(f"{name!r} is not a pixel codec name ({', '.join(PIXEL_CODECS)})")
    if spec is None:
        raise PreconditionFailed(f"codec {name!r} de-normalises the input image with the model's mean/std: "
                                 "it needs the model (spec) and works only at split 0 ('input')")
    return PixelsCodec(spec, lz4=name.endswith("+lz4"))
