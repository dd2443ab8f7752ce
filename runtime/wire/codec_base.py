"""The base class of the wire codecs (:mod:`runtime.wire.codec` holds the codecs and the registry;
:mod:`runtime.wire.jpeg` the input-only JPEG codec) and the buffer helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import lz4.block
import numpy as np
import torch

from runtime.contracts.errors import InvalidInput
from runtime.models.spec import source_pixels
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.framewire import OutFrame
from runtime.wire.validation import DEFAULT_MAX_BYTES, validate_tensor

if TYPE_CHECKING:
    from runtime.models.spec import ModelSpec


def _tensor_bytes(x: torch.Tensor) -> memoryview:
    """The C-order bytes of ``x`` as a buffer (no copy beyond ``contiguous()``)."""
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16: send its bit pattern
        x = x.view(torch.int16)
    if x.numel() == 0:
        return memoryview(b"")
    return x.reshape(-1).numpy().data.cast("B")


# torch dtypes numpy holds too: their tensors are made by numpy (frombuffer, reshape) and handed to torch once
# (one torch call instead of two: a 1000-value result took 55 us on the agent's loop thread between frames, where
# torch's dispatch runs cold; 1.69 -> 0.94 us warm; issue 14)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                 torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32,
                 torch.int64: np.int64, torch.bool: np.bool_}


Payload = bytes | bytearray | memoryview  # a payload as decoded: a writable copy, or the received bytes (read only)


class _Exposed:
    """An array's memory offered to numpy without its read-only flag (``__array_interface__``), keeping the array
    (and so the bytes) alive. torch has no read-only tensors and warns for each read-only array it is given (an
    error where warnings are errors): a decode that shares a received payload is read only by contract instead
    (Codec.decode ``shared``; fp16 and int8 only read theirs)."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self.__array_interface__ = dict(arr.__array_interface__, data=(arr.__array_interface__["data"][0], False))


def _from_bytes(buf: Payload, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A tensor over ``buf`` (taken over, not copied). Over read-only bytes it must not be written."""
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    np_dtype = _NUMPY_DTYPES.get(dtype)
    if np_dtype is None:
        return torch.frombuffer(buf if not isinstance(buf, bytes | memoryview) else bytearray(buf), dtype=dtype).reshape(shape)
    arr: np.ndarray = np.frombuffer(buf, dtype=np_dtype)
    if not arr.flags.writeable:
        arr = np.asarray(_Exposed(arr))
    return torch.from_numpy(arr.reshape(shape))


def _prepare(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InvalidInput(f"expected a torch.Tensor, got {type(x).__name__}")
    return x.detach().cpu().contiguous()


class Codec(ABC):
    """Base class: subclasses implement ``_encode_values`` / ``_decode_values``."""

    name: str = ""
    lossless: bool = True
    codec: tensor_pb2.Codec = tensor_pb2.CODEC_UNSPECIFIED
    nominal_ratio: float = 1.0  # raw float32 bytes / codec bytes, before compression

    def __init__(self, lz4: bool = False) -> None:
        self.lz4 = lz4
        self.compression = tensor_pb2.COMPRESSION_LZ4 if lz4 else tensor_pb2.COMPRESSION_NONE
        self.name = type(self).name + ("+lz4" if lz4 else "")

    def __repr__(self) -> str:
        return f"<Codec {self.name}>"

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tensor_pb2.Tensor:
        msg = tensor_pb2.Tensor()
        self.encode_into(x, msg)
        return msg

    def encode_into(self, x: torch.Tensor, msg: tensor_pb2.Tensor) -> None:
        """Encode ``x`` into ``msg`` (an empty Tensor, e.g. the one inside a stream message: no copy of
        the payload into a second message later)."""
        payload = self.encode_payload(x, msg)
        msg.buffer = payload if isinstance(payload, bytes) else payload.tobytes()

    def encode_frame(self, x: torch.Tensor) -> OutFrame:
        """Encode ``x`` as a frame to send on the stream: every field of its tensor but ``buffer`` in a
        StreamRequest, the payload beside it, written once when gRPC serialises it (runtime.wire.framewire)."""
        req = pb.StreamRequest()
        return OutFrame(req, self.encode_payload(x, req.frame.tensor))

    def encode_payload(self, x: torch.Tensor, msg: tensor_pb2.Tensor) -> bytes | memoryview:
        """Encode ``x``: every field of ``msg`` (an empty Tensor) but ``buffer``, and the payload returned (a
        view of ``x``'s own bytes where the codec sends them as they are, e.g. raw: no copy)."""
        prepared = _prepare(x)
        msg.shape.extend(prepared.shape)
        msg.codec, msg.compression = self.codec, self.compression
        return self._payload(self._encode_input(x, prepared, msg), msg)

    def _encode_input(self, x: torch.Tensor, prepared: torch.Tensor, msg: tensor_pb2.Tensor) -> memoryview:
        """The codec's values of ``prepared`` (``x`` detached, on the CPU, contiguous: a new tensor, so anything
        held beside ``x`` itself is read from ``x``, :class:`InputImageCodec`)."""
        return self._encode_values(prepared, msg)

    def _payload(self, values: memoryview, msg: tensor_pb2.Tensor) -> bytes | memoryview:
        """The payload of the codec's ``values`` (lz4-compressed where the codec says), its sizes set in ``msg``."""
        msg.encoded_size = values.nbytes
        payload = lz4.block.compress(values, mode="default", store_size=False) if self.lz4 else values
        msg.chunks = 1
        msg.payload_size = len(payload)  # from the local bytes: reading msg.buffer back would copy it
        return payload

    @abstractmethod
    def _encode_values(self, x: torch.Tensor, msg: tensor_pb2.Tensor) -> memoryview:
        """The codec's values as bytes; sets the codec's own fields of ``msg``."""

    # -- decoding ---------------------------------------------------------------------------
    #: the tensor ``_decode_values`` returns is a view of its payload (raw): without ``shared``, the payload is a copy
    views_payload: bool = False
    #: ``_decode_values`` only reads its payload (fp16, int8: the tensor is new): it gets the received bytes, no copy
    reads_payload: bool = False

    def decode(self, msg: tensor_pb2.Tensor, *, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
        if msg.codec != self.codec or msg.compression != self.compression:
            raise InvalidInput(
                f"codec={msg.codec} compression={msg.compression} cannot be decoded by {self.name} "
                f"(expects codec={self.codec} compression={self.compression})"
            )
        validate_tensor(msg, max_bytes=max_bytes)
        return self._decode_validated(msg)

    def _decode_validated(self, msg: tensor_pb2.Tensor, shared: bool = False) -> torch.Tensor:
        """The tensor of a checked ``msg``. ``shared``: a codec whose tensor views its payload (raw) may return a
        view of ``msg.buffer``'s bytes themselves (no copy; read only: the caller must not write into it)."""
        if msg.chunks > 1 and len(msg.buffer) != msg.payload_size:
            raise InvalidInput(
                f"len(buffer)={len(msg.buffer)} but payload_size={msg.payload_size} over "
                f"chunks={msg.chunks}: join all chunks into buffer before decoding"
            )
        payload: Payload
        if self.lz4:
            payload = self._decompress(msg)  # a new bytearray, writable
        elif self.reads_payload or (shared and self.views_payload):
            # the received bytes themselves, read only (a protobuf message's bytes field is already its own copy;
            # framewire's a view): no copy
            payload = msg.buffer
        else:
            payload = bytearray(msg.buffer)  # one copy, writable
        return self._decode_values(payload, msg)

    @staticmethod
    def _decompress(msg: tensor_pb2.Tensor) -> bytearray:
        size = msg.encoded_size  # already checked == expected size <= max_bytes
        if size == 0:
            return bytearray()
        try:
            out: bytearray = lz4.block.decompress(msg.buffer, uncompressed_size=size, return_bytearray=True)
        except lz4.block.LZ4BlockError as e:
            raise InvalidInput(f"buffer is not a valid lz4 block of encoded_size={size}: {e}") from e
        if len(out) != size:
            raise InvalidInput(f"lz4 buffer decompressed to {len(out)} bytes; encoded_size={size}")
        return out

    @abstractmethod
    def _decode_values(self, payload: Payload, msg: tensor_pb2.Tensor) -> torch.Tensor:
        """The tensor from the (decompressed) payload: a writable bytearray, or the received bytes themselves (read
        only) for a codec whose ``reads_payload`` (or ``views_payload`` and a shared decode) says it takes them."""

    # -- estimates --------------------------------------------------------------------------
    def estimate_ratio(self, x: torch.Tensor | None = None) -> float:
        """Raw float32 bytes / wire bytes: nominal without ``x``, measured on ``x`` with lz4."""
        if x is None or x.numel() == 0:
            return self.nominal_ratio
        if not self.lz4:
            return self.nominal_ratio if self.codec != tensor_pb2.CODEC_RAW else 4 / x.element_size()
        msg = self.encode(x)
        return x.numel() * 4 / max(1, len(msg.buffer) + 8 * len(msg.scale))


class InputImageCodec(Codec):
    """A codec of the model's input as the camera's 8-bit image (jpeg, pixels, webp): split 0 only; ``spec``
    gives the normalisation (mean/std) and the input size. Subclasses code the pixels (``_encode_pixels``).

    An input that still holds the pixels it was made from (:func:`runtime.models.spec.source_pixels`: every frame
    source's, unchanged since) is sent from them as they are; any other is de-normalised, rounded and clamped back
    to pixels first. For an input made from 8-bit pixels both give the same bytes; the first skips 0.2-0.6 ms of
    the board's time a 224 x 224 frame (issue 14)."""

    def __init__(self, spec: ModelSpec, lz4: bool = False) -> None:
        super().__init__(lz4)
        self.spec = spec
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
        self._mean_hwc = np.array(spec.mean, dtype=np.float32)  # the same float32 values, for pixels (H, W, 3)
        self._std_hwc = np.array(spec.std, dtype=np.float32)

    def _check_shape(self, shape: list[int]) -> None:
        h, w = self.spec.input_size
        if shape != [1, 3, h, w]:
            raise InvalidInput(f"codec {self.name} carries {self.spec.name}'s input image [1, 3, {h}, {w}], got "
                               f"shape {shape}: use it only at split 0 ('input')")

    def _encode_input(self, x: torch.Tensor, prepared: torch.Tensor, msg: tensor_pb2.Tensor) -> memoryview:
        pixels = source_pixels(x)
        if pixels is None:
            return self._encode_values(prepared, msg)
        self._check_shape(list(prepared.shape))  # a tensor source_pixels answers for holds pixels of its own (H, W)
        msg.dtype = "float32"
        return self._encode_pixels(pixels)

    def _encode_values(self, x: torch.Tensor, msg: tensor_pb2.Tensor) -> memoryview:
        return self._encode_pixels(self._to_pixels(x, msg))

    @abstractmethod
    def _encode_pixels(self, pixels: np.ndarray) -> memoryview:
        """The codec's bytes of uint8 RGB ``pixels`` (H, W, 3), C order."""

    def _to_pixels(self, x: torch.Tensor, msg: tensor_pb2.Tensor) -> np.ndarray:
        """The de-normalised input as uint8 (H, W, 3) (checked); the decoded tensor will be float32.

        numpy, written in (H, W, 3) order once: ``x * std + mean`` in float32 (two roundings, as torch's two
        operations), rounded half to even, clamped to [0, 255] in place, then one cast. 0.07 ms warm against
        0.24 for the same in torch in (3, H, W) and a transposed copy (MobileNetV2, 224 x 224; issue 14)."""
        self._check_shape(list(x.shape))
        if not x.is_floating_point():
            raise InvalidInput(f"codec {self.name} needs the float input tensor, got dtype {x.dtype}")
        msg.dtype = "float32"
        chw = (x[0] if x.dtype == torch.float32 else x[0].float()).numpy()
        f = np.multiply(chw.transpose(1, 2, 0), self._std_hwc)
        np.add(f, self._mean_hwc, out=f)
        np.rint(f, out=f)
        np.clip(f, 0, 255, out=f)
        with np.errstate(invalid="ignore"):  # NaN: torch's cast gave 0 too, without a warning
            pixels: np.ndarray = f.astype(np.uint8)
        return pixels

    def _from_pixels(self, pix: torch.Tensor) -> torch.Tensor:
        """The model's normalised input [1, 3, H, W] from float pixel values [3, H, W]."""
        return ((pix - self.mean) / self.std).unsqueeze(0).contiguous()
