"""Header checks for wire tensors, run before anything is allocated or decompressed.

:func:`validate_tensor` looks only at the message's scalar fields, the scale lists and the
length of ``buffer``: it never touches the payload bytes, so a hostile header (a 1 GiB LZ4
claim, a shape whose product overflows, mismatched scale lists) costs nothing to refuse.
Sizes are computed with Python ints, so they cannot overflow.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence

import torch

from runtime.contracts.errors import InvalidInput, TooLarge
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.limits import DEFAULT_MAX_BYTES as DEFAULT_MAX_BYTES  # re-exported: the cap on a decoded tensor

if sys.byteorder != "little":  # the wire is little-endian and the codecs use native views
    raise ImportError("edgesplit codecs support little-endian hosts only")


MAX_RANK = 8
MAX_DIM = 2**31

#: dtype name on the wire -> torch dtype. bfloat16 travels as its own 2-byte pattern.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty(0, dtype=v).element_size() for k, v in DTYPES.items()}

CODEC_ENUM_NAMES = {
    tensor_pb2.CODEC_RAW: "CODEC_RAW",
    tensor_pb2.CODEC_FP16: "CODEC_FP16",
    tensor_pb2.CODEC_INT8: "CODEC_INT8",
    tensor_pb2.CODEC_ANS: "CODEC_ANS",
    tensor_pb2.CODEC_JPEG: "CODEC_JPEG",
    tensor_pb2.CODEC_PIXELS: "CODEC_PIXELS",
    tensor_pb2.CODEC_WEBP: "CODEC_WEBP",
}
COMPRESSION_ENUM_NAMES = {
    tensor_pb2.COMPRESSION_NONE: "COMPRESSION_NONE",
    tensor_pb2.COMPRESSION_LZ4: "COMPRESSION_LZ4",
}
#: bytes per element of the codec output (before compression); None = that of the dtype.
_WIRE_ITEMSIZE = {tensor_pb2.CODEC_RAW: None, tensor_pb2.CODEC_FP16: 2, tensor_pb2.CODEC_INT8: 1,
                  tensor_pb2.CODEC_PIXELS: 1}


def ans_bound(n: int) -> int:
    """Most bytes an ANS stream of ``n`` symbols may take: 24-bit model precision bounds a
    symbol's cost at 3 bytes, plus the coder's final state (one more word)."""
    return 3 * n + 8


def lz4_bound(n: int) -> int:
    """LZ4_compressBound: the largest block lz4 can produce from ``n`` input bytes."""
    return n + n // 255 + 16


def numel(shape: Iterable[int]) -> int:
    return math.prod(int(d) for d in shape)


def channel_count(shape: Sequence[int], axis: int) -> int:
    """Number of quantisation channels: ``shape[axis]``, or 1 for a scalar."""
    return 1 if len(shape) == 0 else int(shape[axis])


def expected_encoded_size(msg: tensor_pb2.Tensor) -> int:
    """Bytes the codec output must have for this header (assumes codec and dtype are valid).
    CODEC_ANS and CODEC_JPEG have no fixed size: :func:`_check_ans` / :func:`_check_jpeg` bound them."""
    if msg.codec in (tensor_pb2.CODEC_ANS, tensor_pb2.CODEC_JPEG, tensor_pb2.CODEC_WEBP):
        return msg.encoded_size
    item = _WIRE_ITEMSIZE[msg.codec] or ITEMSIZE[msg.dtype]
    return numel(msg.shape) * item


#: headers that passed (codec, compression, dtype, shape, encoded_size, quant_axis, scale and zero_point
#: counts, max_bytes) -> their encoded size: a stream's frames and results repeat one header, whose checks
#: then cost one lookup (~4 us instead of ~12 warm, 29 us in a frame on the agent; issue 14). The payload's
#: size and an int8 header's scale values are checked on every message. Bounded: past the cap, no more are kept.
_PASSED: dict[tuple[object, ...], int] = {}
MAX_PASSED = 256


def validate_tensor(msg: tensor_pb2.Tensor, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Check a wire tensor's header; raise :class:`InvalidInput` or :class:`TooLarge`.

    Works on a complete message and on the first chunk of a chunked one (``chunks > 1``:
    ``buffer`` may then hold any prefix of the ``payload_size`` bytes).
    """
    key = (msg.codec, msg.compression, msg.dtype, tuple(msg.shape), msg.encoded_size, msg.quant_axis,
           len(msg.scale), len(msg.zero_point), max_bytes)
    expected = _PASSED.get(key)
    if expected is None:
        expected = _check_header(msg, max_bytes)
        if len(_PASSED) < MAX_PASSED:
            _PASSED[key] = expected
    elif msg.codec == tensor_pb2.CODEC_INT8:
        _check_int8(msg, list(msg.shape))  # the values: the key holds only their counts
    _check_payload(msg, expected)


def _check_header(msg: tensor_pb2.Tensor, max_bytes: int) -> int:
    """Every check of :func:`validate_tensor` but the payload's size; returns the encoded size expected."""
    if msg.codec not in CODEC_ENUM_NAMES:
        raise InvalidInput(
            f"codec={msg.codec} is not supported; allowed: "
            + ", ".join(f"{n} ({v})" for v, n in CODEC_ENUM_NAMES.items())
        )
    if msg.compression not in COMPRESSION_ENUM_NAMES:
        raise InvalidInput(
            f"compression={msg.compression} is not supported; allowed: "
            + ", ".join(f"{n} ({v})" for v, n in COMPRESSION_ENUM_NAMES.items())
        )
    if msg.dtype not in DTYPES:
        raise InvalidInput(f"dtype={msg.dtype!r} is not supported; allowed: {sorted(DTYPES)}")
    if msg.codec != tensor_pb2.CODEC_RAW and msg.dtype != "float32":
        raise InvalidInput(
            f"dtype={msg.dtype!r} with codec={CODEC_ENUM_NAMES[msg.codec]}: "
            "lossy codecs decode to 'float32' only"
        )
    shape = list(msg.shape)
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"shape has rank {len(shape)}; allowed rank is 0..{MAX_RANK}")
    for i, d in enumerate(shape):
        if d > MAX_DIM:
            raise InvalidInput(f"shape[{i}]={d} is out of range; allowed 0..{MAX_DIM}")
    n = numel(shape)
    decoded = n * ITEMSIZE[msg.dtype]
    if decoded > max_bytes:
        raise TooLarge(
            f"decoded tensor shape={shape} dtype={msg.dtype} is {decoded} bytes; "
            f"the limit is max_bytes={max_bytes}"
        )
    if msg.codec == tensor_pb2.CODEC_ANS:
        _check_ans(msg, n)
    elif msg.codec in (tensor_pb2.CODEC_JPEG, tensor_pb2.CODEC_WEBP):
        _check_jpeg(msg, shape, n)
    elif msg.codec == tensor_pb2.CODEC_PIXELS and (len(shape) != 4 or shape[0] != 1 or shape[1] != 3):
        raise InvalidInput(f"CODEC_PIXELS carries one RGB image: shape must be [1, 3, H, W], got {shape}")
    expected = expected_encoded_size(msg)
    if msg.encoded_size != expected:
        raise InvalidInput(
            f"encoded_size={msg.encoded_size} does not match shape={shape} with "
            f"codec={CODEC_ENUM_NAMES[msg.codec]} dtype={msg.dtype}: expected {expected}"
        )
    if msg.codec == tensor_pb2.CODEC_INT8:
        _check_int8(msg, shape)
    elif len(msg.scale) or len(msg.zero_point):
        raise InvalidInput(
            f"scale/zero_point are set ({len(msg.scale)}/{len(msg.zero_point)} values) "
            "but only CODEC_INT8 uses them"
        )
    return expected


def _check_ans(msg: tensor_pb2.Tensor, n: int) -> None:
    if msg.compression != tensor_pb2.COMPRESSION_NONE:
        raise InvalidInput("CODEC_ANS is already entropy-coded: compression must be COMPRESSION_NONE")
    bound = ans_bound(n)
    if msg.encoded_size % 4 or msg.encoded_size > bound or (n and not msg.encoded_size):
        raise InvalidInput(f"encoded_size={msg.encoded_size} is invalid for CODEC_ANS of shape {list(msg.shape)}: "
                           f"must be a non-zero multiple of 4 and <= {bound}")


def jpeg_bound(n: int) -> int:
    """Most bytes a CODEC_JPEG payload of ``n`` values may take: the raw float32 tensor's size (a
    JPEG bigger than that would be no use; real ones of camera images are 10-30x smaller)."""
    return 4 * n


def _check_jpeg(msg: tensor_pb2.Tensor, shape: list[int], n: int) -> None:
    """An input image's file (CODEC_JPEG, CODEC_WEBP): uncompressed, one RGB image, at most fp32's bytes."""
    name = CODEC_ENUM_NAMES[msg.codec]
    if msg.compression != tensor_pb2.COMPRESSION_NONE:
        raise InvalidInput(f"{name} is already compressed: compression must be COMPRESSION_NONE")
    if len(shape) != 4 or shape[0] != 1 or shape[1] != 3:
        raise InvalidInput(f"{name} carries one RGB image: shape must be [1, 3, H, W], got {shape}")
    bound = jpeg_bound(n)
    if not 0 < msg.encoded_size <= bound:
        raise InvalidInput(f"encoded_size={msg.encoded_size} is invalid for {name} of shape {shape}: "
                           f"must be 1..{bound}")


def _check_int8(msg: tensor_pb2.Tensor, shape: list[int]) -> None:
    rank = len(shape)
    if msg.quant_axis >= max(rank, 1):
        raise InvalidInput(
            f"quant_axis={msg.quant_axis} is out of range for rank {rank}; "
            f"allowed 0..{max(rank, 1) - 1}"
        )
    c = channel_count(shape, msg.quant_axis)
    if len(msg.scale) != c or len(msg.zero_point) != c:
        raise InvalidInput(
            f"len(scale)={len(msg.scale)} and len(zero_point)={len(msg.zero_point)} must both "
            f"equal shape[quant_axis={msg.quant_axis}]={c}"
        )
    if c:
        s = torch.tensor(msg.scale, dtype=torch.float32)
        bad = ~(torch.isfinite(s) & (s > 0))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise InvalidInput(f"scale[{i}]={msg.scale[i]} is invalid; must be finite and > 0")
        z = torch.tensor(msg.zero_point, dtype=torch.float32)
        bad = ~torch.isfinite(z)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise InvalidInput(f"zero_point[{i}]={msg.zero_point[i]} is invalid; must be finite")


def _check_payload(msg: tensor_pb2.Tensor, expected: int) -> None:
    lz4 = msg.compression == tensor_pb2.COMPRESSION_LZ4
    bound = lz4_bound(expected) if lz4 else expected
    what = f"<= {bound} (lz4 bound of encoded_size)" if lz4 else f"== encoded_size={expected}"
    if msg.chunks <= 1:
        if msg.payload_size and msg.payload_size != len(msg.buffer):
            raise InvalidInput(
                f"payload_size={msg.payload_size} but len(buffer)={len(msg.buffer)} "
                f"with chunks={msg.chunks}; they must match (or payload_size be 0)"
            )
        size = len(msg.buffer)
        ok = size <= bound if lz4 else size == bound
        if not ok:
            raise InvalidInput(f"len(buffer)={size} is invalid; must be {what}")
        return
    size = msg.payload_size
    ok = size <= bound if lz4 else size == bound
    if not ok:
        raise InvalidInput(f"payload_size={size} with chunks={msg.chunks} is invalid; must be {what}")
    if len(msg.buffer) > size:
        raise InvalidInput(f"len(buffer)={len(msg.buffer)} exceeds payload_size={size}")
