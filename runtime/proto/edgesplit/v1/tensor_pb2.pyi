from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_RAW: _ClassVar[Codec]
    CODEC_FP16: _ClassVar[Codec]
    CODEC_INT8: _ClassVar[Codec]
    CODEC_ANS: _ClassVar[Codec]
    CODEC_JPEG: _ClassVar[Codec]
    CODEC_PIXELS: _ClassVar[Codec]
    CODEC_WEBP: _ClassVar[Codec]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_LZ4: _ClassVar[Compression]
CODEC_UNSPECIFIED: Codec
CODEC_RAW: Codec
CODEC_FP16: Codec
CODEC_INT8: Codec
CODEC_ANS: Codec
CODEC_JPEG: Codec
CODEC_PIXELS: Codec
CODEC_WEBP: Codec
COMPRESSION_NONE: Compression
COMPRESSION_LZ4: Compression

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "codec", "compression", "scale", "zero_point", "quant_axis", "encoded_size", "buffer", "chunks", "payload_size")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    QUANT_AXIS_FIELD_NUMBER: _ClassVar[int]
    ENCODED_SIZE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    codec: Codec
    compression: Compression
    scale: _containers.RepeatedScalarFieldContainer[float]
    zero_point: _containers.RepeatedScalarFieldContainer[float]
    quant_axis: int
    encoded_size: int
    buffer: bytes
    chunks: int
    payload_size: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., codec: _Optional[_Union[Codec, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., scale: _Optional[_Iterable[float]] = ..., zero_point: _Optional[_Iterable[float]] = ..., quant_axis: _Optional[int] = ..., encoded_size: _Optional[int] = ..., buffer: _Optional[bytes] = ..., chunks: _Optional[int] = ..., payload_size: _Optional[int] = ...) -> None: ...
