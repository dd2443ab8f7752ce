from runtime.proto.edgesplit.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRequest(_message.Message):
    __slots__ = ("image", "tensor")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    tensor: _tensor_pb2.Tensor
    def __init__(self, image: _Optional[bytes] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class SubmitResult(_message.Message):
    __slots__ = ("seq", "class_index", "label", "score", "where", "fallback_reason", "plan_version", "split_id", "head_seconds", "encode_seconds", "transfer_edge_seconds", "total_seconds", "wire_bytes", "output")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    WHERE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPLIT_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_EDGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    class_index: int
    label: str
    score: float
    where: str
    fallback_reason: str
    plan_version: int
    split_id: str
    head_seconds: float
    encode_seconds: float
    transfer_edge_seconds: float
    total_seconds: float
    wire_bytes: int
    output: _tensor_pb2.Tensor
    def __init__(self, seq: _Optional[int] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., where: _Optional[str] = ..., fallback_reason: _Optional[str] = ..., plan_version: _Optional[int] = ..., split_id: _Optional[str] = ..., head_seconds: _Optional[float] = ..., encode_seconds: _Optional[float] = ..., transfer_edge_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., wire_bytes: _Optional[int] = ..., output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
