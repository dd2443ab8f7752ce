"""Wire codecs for split-point feature tensors (in the spirit of hivemind's compression classes).

Six codecs, named ``raw``, ``fp16``, ``int8`` and each of those with ``+lz4``:

* ``raw`` -- the tensor's own dtype bytes, little-endian, C order; bit-exact.
* ``fp16`` -- floating input is sent as IEEE half and decoded to float32 (``dtype`` on the wire
  stays ``"float32"``). Relative error <= 2^-11 in the normal range (absolute <= 2^-25 below
  2^-14). Finite values beyond the half range, and +-inf, are *saturated* to +-65504 rather than
  becoming inf; NaN stays NaN.
* ``int8`` -- per-channel affine uint8 along ``quant_axis`` (1 for rank >= 2, i.e. NCHW channels;
  0 for rank 1; a scalar is one channel). Per channel ``lo = min``, ``hi = max``,
  ``scale = (hi - lo) / 255`` (1.0 for a constant channel, which then decodes exactly to ``lo``),
  ``q = clip(round((x - lo) / scale), 0, 255)``, decoded as ``q * scale + zero_point`` with
  ``zero_point = lo``. Error <= scale/2 (plus float rounding) per element. NaN/inf input is refused.
* ``+lz4`` -- the codec output compressed as one lz4 block (fast level, no size header); the
  decompressed size is ``encoded_size``, which :func:`validate_tensor` checks against the shape and
  ``max_bytes`` before anything is decompressed.

Two codecs take a model and are not in the plain registry:

* ``ans`` -- integer coefficients of a *transform* Transfer Layer, rANS-coded against the TL's
  static per-(channel, band) model (:mod:`runtime.wire.entropy`); lossless for integers in the
  model's range. ``get_codec("ans", model=tl.entropy_model)`` builds it; a worker decodes it
  with the model of the TL the frame names (``decode_tensor`` alone refuses it).

Two codecs take the model's spec and work only at split point 0 (``input``):

* ``jpeg`` (``jpegQ`` for quality Q) -- the de-normalised input image as a JPEG
  (:mod:`runtime.wire.jpeg`); ``get_codec("jpeg", spec=loaded.spec)`` builds it and a worker decodes
  it with the spec of the model the frame names.
* ``pixels`` / ``pixels+lz4`` -- the input image as lossless 8-bit pixels (:mod:`runtime.wire.pixels`): exact
  for inputs made from 8-bit images, 1/4 of fp32's bytes before lz4; built and decoded as ``jpeg`` is.
* ``webp`` -- the input image as a lossless WebP (:mod:`runtime.wire.webp`): exact as ``pixels``, about half the
  bytes of ``pixels+lz4`` on photos for a slower encode; built and decoded as ``jpeg`` is.

Every codec puts the whole payload in ``buffer`` (``chunks = 1``); a caller that splits or joins
chunks does so around :meth:`Codec.encode` / :func:`decode_tensor`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lz4.block  # noqa: F401 (the codecs compress in codec_base; tests patch lz4 through this module)
import torch

from runtime.contracts.errors import InvalidInput, PreconditionFailed
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.codec_base import Codec, Payload, _from_bytes, _tensor_bytes
from runtime.wire.validation import (
    DEFAULT_MAX_BYTES,
    DTYPE_NAMES,
    DTYPES,
    channel_count,
    validate_tensor,
)

if TYPE_CHECKING:
    from runtime.models.spec import ModelSpec
    from runtime.wire.entropy import EntropyModel

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Codec",
    "codec_at",
    "codec_names",
    "decode_tensor",
    "encode_output",
    "get_codec",
    "validate_tensor",
]

FP16_MAX = 65504.0


def _quant_axis(rank: int) -> int:
    return 1 if rank >= 2 else 0


def _as_3d(x: torch.Tensor, axis: int) -> torch.Tensor:
    """View ``x`` as (before, channels, after) around ``axis``; a scalar is (1, 1, 1)."""
    if x.dim() == 0:
        return x.reshape(1, 1, 1)
    return x.reshape(x.shape[:axis].numel(), x.shape[axis], x.shape[axis + 1 :].numel())


class RawCodec(Codec):
    name = "raw"
    lossless = True
    codec = tensor_pb2.CODEC_RAW
    nominal_ratio = 1.0
    views_payload = True

    def _encode_values(self, x: torch.Tensor, msg: tensor_pb2.Tensor) -> memoryview:
        if x.dtype not in DTYPE_NAMES:
            raise InvalidInput(f"dtype {x.dtype} is not supported by raw; allowed: {sorted(DTYPES)}")
        msg.dtype = DTYPE_NAMES[x.dtype]
        return _tensor_bytes(x)

    def _decode_values(self, payload: Payload, msg: tensor_pb2.Tensor) -> torch.Tensor:
        shape = list(msg.shape)
        if msg.dtype == "bool" and len(payload):
            raw = _from_bytes(payload, torch.uint8, [len(payload)])
            if bool((raw > 1).any()):
                raise InvalidInput("dtype='bool' buffer holds bytes other than 0 and 1")
        if msg.dtype == "bfloat16":
            return _from_bytes(payload, torch.int16, shape).view(torch.bfloat16)
        return _from_bytes(payload, DTYPES[msg.dtype], shape)


def _require_float(x: torch.Tensor, name: str) -> torch.Tensor:
    if not x.is_floating_point():
        raise InvalidInput(f"codec {name} needs a floating-point tensor, got dtype {x.dtype}; use raw")
    return x if x.dtype == torch.float32 else x.float()


class Fp16Codec(Codec):
    name = "fp16"
    lossless = False
    codec = tensor_pb2.CODEC_FP16
    nominal_ratio = 2.0
    reads_payload = True  # .float() makes the tensor

    def _encode_values(self, x: torch.Tensor, msg: tensor_pb2.Tensor) -> memoryview:
        x = _require_float(x, self.name)
        msg.dtype = "float32"
        h = x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)  # saturate instead of overflowing to inf
        return _tensor_bytes(h)

    def _decode_values(self, payload: Payload, msg: tensor_pb2.Tensor) -> torch.Tensor:
        return _from_bytes(payload, torch.float16, list(msg.shape)).float()


class Int8Codec(Codec):
    name = "int8"
    lossless = False
    codec = tensor_pb2.CODEC_INT8
    nominal_ratio = 4.0
    reads_payload = True  # q.to(float32) makes the tensor

    def _encode_values(self, x: torch.Tensor, msg: tensor_pb2.Tensor) -> memoryview:
        x = _require_float(x, self.name)
        msg.dtype = "float32"
        axis = _quant_axis(x.dim())
        msg.quant_axis = axis
        if x.numel() == 0:  # no values: neutral parameters, one per channel
            c = channel_count(x.shape, axis)
            msg.scale.extend([1.0] * c)
            msg.zero_point.extend([0.0] * c)
            return memoryview(b"")
        x3 = _as_3d(x, axis)
        lo = x3.amin(dim=(0, 2))
        hi = x3.amax(dim=(0, 2))
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        if not bool(finite.all()):
            c = int((~finite).nonzero()[0])
            kind = "NaN" if bool(torch.isnan(x3[:, c]).any()) else "inf"
            raise InvalidInput(f"int8 cannot encode non-finite values: channel {c} contains {kind}")
        span = hi - lo
        if not bool(torch.isfinite(span).all()):
            c = int((~torch.isfinite(span)).nonzero()[0])
            raise InvalidInput(
                f"int8 cannot encode channel {c}: range max-min = {float(hi[c]) - float(lo[c]):.3g} "
                "exceeds the float32 range; use fp16 or raw"
            )
        scale = torch.where(span > 0, span / 255, torch.ones_like(span))
        scale = torch.where(scale > 0, scale, torch.full_like(scale, 2**-149))  # span/255 underflow
        q = (x3 - lo[None, :, None]).div_(scale[None, :, None]).round_().clamp_(0, 255)
        msg.scale.extend(scale.tolist())
        msg.zero_point.extend(lo.tolist())
        return _tensor_bytes(q.to(torch.uint8))

    def _decode_values(self, payload: Payload, msg: tensor_pb2.Tensor) -> torch.Tensor:
        shape = list(msg.shape)
        if len(payload) == 0:
            return torch.empty(shape, dtype=torch.float32)
        q = _from_bytes(payload, torch.uint8, [len(payload)])
        axis = msg.quant_axis
        c = channel_count(shape, axis)
        before = torch.Size(shape[:axis]).numel()
        scale = torch.tensor(msg.scale, dtype=torch.float32)[None, :, None]
        zero = torch.tensor(msg.zero_point, dtype=torch.float32)[None, :, None]
        out = q.to(torch.float32).reshape(before, c, -1)
        return out.mul_(scale).add_(zero).reshape(shape)


class AnsCodec(Codec):
    """``ans``: integer coefficients coded with an :class:`runtime.wire.entropy.EntropyModel`."""

    name = "ans"
    lossless = False  # lossless for integers in the model's range; other values are rounded/clipped
    codec = tensor_pb2.CODEC_ANS
    nominal_ratio = 4.0  # a guess before measuring (the real ratio depends on the data)

    def __init__(self, model: EntropyModel) -> None:
        super().__init__(False)
        self.model = model

    def _encode_values(self, x: torch.Tensor, msg: tensor_pb2.Tensor) -> memoryview:
        x = _require_float(x, "ans")
        msg.dtype = "float32"
        r = self.model.range
        return memoryview(self.model.encode(torch.clamp(torch.round(x), -r, r)))

    def _decode_values(self, payload: Payload, msg: tensor_pb2.Tensor) -> torch.Tensor:
        shape = list(msg.shape)
        if len(shape) != 4 or tuple(shape[1:]) != self.model.shape:
            raise InvalidInput(f"ans tensor shape {shape} does not match this model's coefficients "
                               f"[N, {', '.join(map(str, self.model.shape))}]")
        return self.model.decode(payload, shape[0])

    def estimate_ratio(self, x: torch.Tensor | None = None) -> float:
        if x is None or x.numel() == 0:
            return self.nominal_ratio
        return x.numel() * 4 / max(1, len(self.encode(x).buffer))


_CODECS: dict[str, Codec] = {
    c.name: c for cls in (RawCodec, Fp16Codec, Int8Codec) for c in (cls(False), cls(True))
}
_BY_ENUM: dict[tuple[int, int], Codec] = {(c.codec, c.compression): c for c in _CODECS.values()}


MODEL_CODECS = ("ans",)  # codecs that need a Transfer Layer's entropy model


def codec_names(model: EntropyModel | None = None) -> list[str]:
    """The codec names; with a TL's entropy model also those that code with it."""
    return list(_CODECS) + (list(MODEL_CODECS) if model is not None else [])


def get_codec(name: str, model: EntropyModel | None = None, spec: ModelSpec | None = None) -> Codec:
    """The codec called ``name``. ``ans`` needs ``model`` (a transform TL's ``entropy_model``);
    ``jpeg``/``jpegQ`` and ``pixels(+lz4)`` need ``spec`` (the model's mean/std and input size) and split 0."""
    from runtime.wire.jpeg import is_jpeg, jpeg_codec  # lazily: it builds on codec_base, not on this module
    from runtime.wire.pixels import is_pixels, pixels_codec
    from runtime.wire.webp import is_webp, webp_codec

    if is_jpeg(name):
        return jpeg_codec(name, spec)
    if is_pixels(name):
        return pixels_codec(name, spec)
    if is_webp(name):
        return webp_codec(name, spec)
    if name in MODEL_CODECS:
        if model is None:
            raise InvalidInput(f"codec {name!r} entropy-codes with a transform Transfer Layer's model: use it with "
                               "a TL of kind 'transform' (--tl), or choose one of " + ", ".join(_CODECS))
        return AnsCodec(model)
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise InvalidInput(f"unknown codec {name!r}; valid codecs: {', '.join([*_CODECS, *MODEL_CODECS])}, "
                           "and jpeg/jpegQ, pixels, pixels+lz4, webp at split 'input'") from None


def codec_at(codec: str | Codec, split_index: int, split_name: str = "", model: EntropyModel | None = None,
             spec: ModelSpec | None = None) -> Codec:
    """``codec`` (a name, built as :func:`get_codec` builds it, or a codec) for frames cut at split point
    ``split_index``: InvalidInput for a JPEG codec anywhere but split 0 (``input``)."""
    from runtime.wire.jpeg import check_split

    cod = codec if isinstance(codec, Codec) else get_codec(codec, model=model, spec=spec)
    check_split(cod, split_index, split_name)
    return cod


def decode_tensor(msg: tensor_pb2.Tensor, *, max_bytes: int = DEFAULT_MAX_BYTES,
                  model: EntropyModel | None = None, spec: ModelSpec | None = None, shared: bool = False) -> torch.Tensor:
    """Validate and decode a wire tensor, whatever its codec (what the server calls). A
    ``CODEC_ANS`` tensor needs ``model``, the entropy model of the TL the frame names; a
    ``CODEC_JPEG`` or ``CODEC_PIXELS`` one ``spec``, the spec of the model the frame names.

    ``shared``: a raw, uncompressed tensor may be a view of ``msg.buffer``'s own bytes (no copy of the payload;
    803 KB: 21 us warm, 0.1-0.3 ms cold on the worker). Such a tensor is read only: nothing may write into it
    (torch has no read-only tensors; runtime.worker.service decodes shared only for tails seen not to write
    their input). Every other codec's tensor is new and writable either way."""
    validate_tensor(msg, max_bytes=max_bytes)
    if msg.codec == tensor_pb2.CODEC_PIXELS:
        if spec is None:
            raise PreconditionFailed("the tensor is an input image (CODEC_PIXELS): only a model's input at split 0 "
                                     "('input') is decoded from pixels")
        lz4 = msg.compression == tensor_pb2.COMPRESSION_LZ4
        return get_codec("pixels+lz4" if lz4 else "pixels", spec=spec)._decode_validated(msg)
    if msg.codec == tensor_pb2.CODEC_WEBP:
        if spec is None:
            raise PreconditionFailed("the tensor is a WebP input image (CODEC_WEBP): only a model's input at split 0 "
                                     "('input') is decoded from a WebP")
        return get_codec("webp", spec=spec)._decode_validated(msg)
    if msg.codec == tensor_pb2.CODEC_JPEG:
        if spec is None:
            raise PreconditionFailed("the tensor is a JPEG input image (CODEC_JPEG): only a model's input at split 0 "
                                     "('input') is decoded from a JPEG")
        return get_codec("jpeg", spec=spec)._decode_validated(msg)
    if msg.codec == tensor_pb2.CODEC_ANS:
        if model is None:
            raise PreconditionFailed("the tensor is entropy-coded (CODEC_ANS) but names no transform Transfer Layer "
                                     "this side holds: send it with the tl_id of the TL that coded it")
        return AnsCodec(model)._decode_validated(msg)
    return _BY_ENUM[(msg.codec, msg.compression)]._decode_validated(msg, shared)


def encode_output(x: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a result tensor losslessly (raw, uncompressed)."""
    return _CODECS["raw"].encode(x)


def wire_bytes(msg: tensor_pb2.Tensor) -> int:
    """The bytes a tensor takes on the wire: the serialized ``Tensor`` message, i.e. the codec's buffer
    plus shape, dtype and the int8 scales and zero points (8 bytes a channel, outside ``buffer``; for
    a (1, 1000) tensor that is most of it). The one definition: profiles (runtime.measure.profiler)
    price transfers with it and the agent reports it per frame (``FrameResult.wire_bytes``)."""
    return int(msg.ByteSize())
