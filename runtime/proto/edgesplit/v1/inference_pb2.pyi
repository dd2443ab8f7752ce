from runtime.proto.edgesplit.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameHeader(_message.Message):
    __slots__ = ("agent_id", "stream_epoch", "seq", "model_id", "split_id", "plan_version", "model_digest", "tl_id", "end_split", "next_hops", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TL_ID_FIELD_NUMBER: _ClassVar[int]
    END_SPLIT_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOPS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    stream_epoch: int
    seq: int
    model_id: str
    split_id: str
    plan_version: int
    model_digest: str
    tl_id: str
    end_split: str
    next_hops: _containers.RepeatedCompositeFieldContainer[Hop]
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, agent_id: _Optional[str] = ..., stream_epoch: _Optional[int] = ..., seq: _Optional[int] = ..., model_id: _Optional[str] = ..., split_id: _Optional[str] = ..., plan_version: _Optional[int] = ..., model_digest: _Optional[str] = ..., tl_id: _Optional[str] = ..., end_split: _Optional[str] = ..., next_hops: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("address", "end_split", "codec")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    END_SPLIT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    address: str
    end_split: str
    codec: str
    def __init__(self, address: _Optional[str] = ..., end_split: _Optional[str] = ..., codec: _Optional[str] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    tensor: _tensor_pb2.Tensor
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class FrameChunk(_message.Message):
    __slots__ = ("seq", "index", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    index: int
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class FrameCancel(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class StreamProbe(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("frame", "chunk", "cancel", "probe")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    frame: InferRequest
    chunk: FrameChunk
    cancel: FrameCancel
    probe: StreamProbe
    def __init__(self, frame: _Optional[_Union[InferRequest, _Mapping]] = ..., chunk: _Optional[_Union[FrameChunk, _Mapping]] = ..., cancel: _Optional[_Union[FrameCancel, _Mapping]] = ..., probe: _Optional[_Union[StreamProbe, _Mapping]] = ...) -> None: ...

class StageTimes(_message.Message):
    __slots__ = ("queue_seconds", "decode_seconds", "tail_seconds", "forward_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TAIL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    decode_seconds: float
    tail_seconds: float
    forward_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., tail_seconds: _Optional[float] = ..., forward_seconds: _Optional[float] = ...) -> None: ...

class HopTimes(_message.Message):
    __slots__ = ("address", "split_id", "end_split", "times", "encode_seconds", "round_trip_seconds", "wire_bytes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_ID_FIELD_NUMBER: _ClassVar[int]
    END_SPLIT_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TRIP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    address: str
    split_id: str
    end_split: str
    times: StageTimes
    encode_seconds: float
    round_trip_seconds: float
    wire_bytes: int
    def __init__(self, address: _Optional[str] = ..., split_id: _Optional[str] = ..., end_split: _Optional[str] = ..., times: _Optional[_Union[StageTimes, _Mapping]] = ..., encode_seconds: _Optional[float] = ..., round_trip_seconds: _Optional[float] = ..., wire_bytes: _Optional[int] = ...) -> None: ...

class InferResult(_message.Message):
    __slots__ = ("header", "output", "times", "code", "message", "hops", "received_first_seconds", "received_last_seconds", "sent_seconds", "probe")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIRST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_LAST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SENT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    output: _tensor_pb2.Tensor
    times: StageTimes
    code: int
    message: str
    hops: _containers.RepeatedCompositeFieldContainer[HopTimes]
    received_first_seconds: float
    received_last_seconds: float
    sent_seconds: float
    probe: StreamProbe
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ..., output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., times: _Optional[_Union[StageTimes, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., hops: _Optional[_Iterable[_Union[HopTimes, _Mapping]]] = ..., received_first_seconds: _Optional[float] = ..., received_last_seconds: _Optional[float] = ..., sent_seconds: _Optional[float] = ..., probe: _Optional[_Union[StreamProbe, _Mapping]] = ...) -> None: ...

class PrepareRequest(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: FrameHeader
    def __init__(self, header: _Optional[_Union[FrameHeader, _Mapping]] = ...) -> None: ...

class PrepareResult(_message.Message):
    __slots__ = ("input_shape", "input_dtype", "model_digest", "load_seconds", "tl_id", "next_tier")
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TL_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_TIER_FIELD_NUMBER: _ClassVar[int]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_dtype: str
    model_digest: str
    load_seconds: float
    tl_id: str
    next_tier: str
    def __init__(self, input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[str] = ..., model_digest: _Optional[str] = ..., load_seconds: _Optional[float] = ..., tl_id: _Optional[str] = ..., next_tier: _Optional[str] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class ProbeReply(_message.Message):
    __slots__ = ("received_bytes",)
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    def __init__(self, received_bytes: _Optional[int] = ...) -> None: ...
