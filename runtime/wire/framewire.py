"""Frames on the stream without protobuf copies of their payload (issue 14's runtime overhead).

With the upb protobuf runtime every write and every read of a ``bytes`` field copies it, and ``ByteSize``
serialises the whole message to count it. For an 803 KB frame that was a copy into the message, one
more in ``SerializeToString``, and a whole serialisation for the frame's wire bytes: about 0.15 ms on the
agent's event loop per frame, before gRPC's own copy (runtime/measure/results/overhead.md).

:class:`OutFrame` keeps the codec's payload outside the message (a memoryview of the tensor's own bytes
where the codec allows) and :func:`serialize_request` writes it once, straight into the bytes gRPC sends.
The bytes are ordinary protobuf: the message without the payload, then the payload as a second occurrence
of the ``frame.tensor`` field, which every protobuf parser merges into the first (the encoding's rule for
a repeated embedded message). A receiver sees exactly the ``StreamRequest`` with ``buffer`` set.

On the way in, :func:`parse_request` reads a single-message frame the same way backwards: the message is
parsed without its payload and the payload stays a view of the bytes gRPC handed over (:class:`InFrame`),
so the worker's size checks and its decode take it without the parse, ``len(buffer)`` and ``buffer``
copies (one writable copy is made where the codec decodes it).
"""

from __future__ import annotations

from typing import Any, cast

from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import tensor_pb2

_LEN = 2  # protobuf wire type of length-delimited fields
FRAME_FIELD = 1  # StreamRequest.frame
TENSOR_FIELD = 2  # InferRequest.tensor
BUFFER_FIELD = 9  # Tensor.buffer
# smaller frames are parsed by protobuf as before: below about 200 KB the copies saved cost less than the
# Python steps that save them (whole receive path, parse to decoded tensor, p50 on this VM: 62 KB 17 us
# protobuf / 30 us here, 201 KB 32 / 32, 401 KB 68 / 38, 803 KB 206-872 / 54; overhead.md)
MIN_ZERO_COPY_BYTES = 256 * 1024
# fields scanned in Python per message level before handing the bytes to protobuf's C parser: real frames have
# under 20 (a tensor's, a header's, a frame's); a crafted one of 4 MB of 2-byte fields would keep the worker's
# event loop in this loop for seconds
MAX_SCANNED_FIELDS = 64


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int) -> bytes:
    return _varint(field << 3 | _LEN)


_BUFFER_TAG = _tag(BUFFER_FIELD)
_TENSOR_TAG = _tag(TENSOR_FIELD)
_FRAME_TAG = _tag(FRAME_FIELD)


def _read_varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7


class OutFrame:
    """A frame to send: ``request`` (a StreamRequest whose ``frame.tensor`` has every field but ``buffer``)
    and its ``payload`` (the codec's bytes, not copied into the message)."""

    __slots__ = ("payload", "request")

    def __init__(self, request: pb.StreamRequest, payload: bytes | memoryview):
        self.request = request
        self.payload = payload

    @property
    def frame(self) -> pb.InferRequest:
        return self.request.frame

    def _buffer_field(self) -> bytes:
        return _BUFFER_TAG + _varint(len(self.payload))

    def wire_bytes(self) -> int:
        """``runtime.wire.codec.wire_bytes`` of the whole tensor (its ``ByteSize`` with the payload in it),
        counted without serialising the payload."""
        n = len(self.payload)
        return int(self.request.frame.tensor.ByteSize()) + (len(self._buffer_field()) + n if n else 0)

    def serialize(self) -> bytes:
        """The StreamRequest's bytes with the payload in ``frame.tensor.buffer``: one copy of the payload."""
        head: bytes = self.request.frame.SerializeToString()
        if not len(self.payload):  # proto3: an empty bytes field is not written
            return _FRAME_TAG + _varint(len(head)) + head
        buf = self._buffer_field()
        tensor = _TENSOR_TAG + _varint(len(buf) + len(self.payload))
        frame_len = len(head) + len(tensor) + len(buf) + len(self.payload)
        return b"".join((_FRAME_TAG, _varint(frame_len), head, tensor, buf, self.payload))

    def message(self) -> pb.StreamRequest:
        """The plain StreamRequest (the payload copied into ``buffer``), for a frame sent in chunks."""
        self.request.frame.tensor.buffer = bytes(self.payload)
        return self.request


class TensorView:
    """A received ``Tensor`` whose ``buffer`` is a view of the bytes gRPC handed over (no copy): every other
    field is the message's own. Codecs read ``buffer`` through the buffer protocol (``len``, ``bytearray``,
    lz4, numpy), so they take it as they take ``bytes``."""

    __slots__ = ("_msg", "buffer")

    def __init__(self, msg: tensor_pb2.Tensor, buffer: bytes | memoryview):
        object.__setattr__(self, "_msg", msg)
        object.__setattr__(self, "buffer", buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._msg, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "buffer":
            object.__setattr__(self, name, value)
        else:
            setattr(self._msg, name, value)


class InFrame:
    """A frame read by :func:`parse_request`, standing in for both its ``StreamRequest`` (``WhichOneof``,
    ``frame``) and its ``InferRequest`` (``header``, ``tensor``: a :class:`TensorView` over the payload as
    it arrived), so the worker's stream, assembler and service take it unchanged."""

    __slots__ = ("_frame", "_tensor")

    def __init__(self, frame: pb.InferRequest, payload: memoryview):
        self._frame = frame  # its tensor without buffer
        self._tensor = TensorView(frame.tensor, payload)

    def WhichOneof(self, name: str) -> str:  # StreamRequest's own name for it
        return "frame"

    @property
    def frame(self) -> pb.InferRequest:
        return cast(pb.InferRequest, self)  # duck-typed: header and tensor below

    @property
    def header(self) -> pb.FrameHeader:
        return self._frame.header

    @property
    def tensor(self) -> tensor_pb2.Tensor:
        return cast(tensor_pb2.Tensor, self._tensor)  # duck-typed (TensorView)


def serialize_request(msg: OutFrame | pb.StreamRequest) -> bytes:
    """The request serializer of the frame stream (InferStream): OutFrame or a plain StreamRequest."""
    if isinstance(msg, OutFrame):
        return msg.serialize()
    data: bytes = msg.SerializeToString()
    return data


def _fields(data: memoryview, pos: int, end: int) -> list[tuple[int, int, int, int]]:
    """The fields of one message in data[pos:end]: (field number, start of its tag, start and end of its
    value; a length-delimited value without its length)."""
    out: list[tuple[int, int, int, int]] = []
    while pos < end:
        if len(out) >= MAX_SCANNED_FIELDS:
            raise ValueError(f"more than {MAX_SCANNED_FIELDS} fields: left to protobuf")
        start = pos
        key, pos = _read_varint(data, pos, end)
        field, kind = key >> 3, key & 7
        if kind == 0:
            _, pos = _read_varint(data, pos, end)
            out.append((field, start, pos, pos))
            continue
        if kind == _LEN:
            n, pos = _read_varint(data, pos, end)
            value = pos
            pos += n
        elif kind == 1:
            value, pos = pos, pos + 8
        elif kind == 5:
            value, pos = pos, pos + 4
        else:
            raise ValueError(f"wire type {kind} is not used by these messages")
        if pos > end:
            raise ValueError("a field runs past the end of its message")
        out.append((field, start, value, pos))
    return out


def _protobuf(data: bytes) -> pb.StreamRequest:
    msg: pb.StreamRequest = pb.StreamRequest.FromString(data)
    return msg


def parse_request(data: bytes) -> pb.StreamRequest:
    """The request deserializer of the frame stream: a single-message frame of at least
    MIN_ZERO_COPY_BYTES as an InFrame (its payload a view of ``data``), anything else a StreamRequest.
    Malformed bytes fall back to protobuf's own parser, which rejects them as it always did."""
    if len(data) < MIN_ZERO_COPY_BYTES:
        return _protobuf(data)
    view = memoryview(data)
    try:
        outer = _fields(view, 0, len(view))
        if len(outer) != 1 or outer[0][0] != FRAME_FIELD:
            return _protobuf(data)
        _, _, f0, f1 = outer[0]
        tensors = [f for f in _fields(view, f0, f1) if f[0] == TENSOR_FIELD]
        buffers = [(t, b) for t in tensors for b in _fields(view, t[2], t[3]) if b[0] == BUFFER_FIELD]
    except ValueError:
        return _protobuf(data)
    if len(buffers) != 1:
        return _protobuf(data)
    (_, t_tag, t0, t1), (_, b_tag, b0, b1) = buffers[0]
    # the frame without the buffer field: the tensor's length prefix rewritten, everything else as sent
    tensor = bytes(view[t0:b_tag]) + bytes(view[b1:t1])
    frame = pb.InferRequest.FromString(b"".join((bytes(view[f0:t_tag]), _TENSOR_TAG, _varint(len(tensor)), tensor,
                                                bytes(view[t1:f1]))))
    return cast(pb.StreamRequest, InFrame(frame, view[b0:b1]))  # duck-typed: see InFrame

