from runtime.proto.edgesplit.v1 import inference_pb2 as _inference_pb2
from runtime.proto.edgesplit.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TileRegion(_message.Message):
    __slots__ = ("row_start", "row_stop", "col_start", "col_stop")
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_STOP_FIELD_NUMBER: _ClassVar[int]
    COL_START_FIELD_NUMBER: _ClassVar[int]
    COL_STOP_FIELD_NUMBER: _ClassVar[int]
    row_start: int
    row_stop: int
    col_start: int
    col_stop: int
    def __init__(self, row_start: _Optional[int] = ..., row_stop: _Optional[int] = ..., col_start: _Optional[int] = ..., col_stop: _Optional[int] = ...) -> None: ...

class TileRequest(_message.Message):
    __slots__ = ("header", "input_height", "input_width", "output", "input", "crop", "output_codec", "keep_output", "parts", "halo_token")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CODEC_FIELD_NUMBER: _ClassVar[int]
    KEEP_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    HALO_TOKEN_FIELD_NUMBER: _ClassVar[int]
    header: _inference_pb2.FrameHeader
    input_height: int
    input_width: int
    output: TileRegion
    input: TileRegion
    crop: _tensor_pb2.Tensor
    output_codec: str
    keep_output: bool
    parts: _containers.RepeatedCompositeFieldContainer[CropPart]
    halo_token: bytes
    def __init__(self, header: _Optional[_Union[_inference_pb2.FrameHeader, _Mapping]] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., output: _Optional[_Union[TileRegion, _Mapping]] = ..., input: _Optional[_Union[TileRegion, _Mapping]] = ..., crop: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., output_codec: _Optional[str] = ..., keep_output: _Optional[bool] = ..., parts: _Optional[_Iterable[_Union[CropPart, _Mapping]]] = ..., halo_token: _Optional[bytes] = ...) -> None: ...

class CropPart(_message.Message):
    __slots__ = ("address", "tile", "region")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    address: str
    tile: TileRegion
    region: TileRegion
    def __init__(self, address: _Optional[str] = ..., tile: _Optional[_Union[TileRegion, _Mapping]] = ..., region: _Optional[_Union[TileRegion, _Mapping]] = ...) -> None: ...

class FetchRegionRequest(_message.Message):
    __slots__ = ("header", "tile", "region", "halo_token")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    HALO_TOKEN_FIELD_NUMBER: _ClassVar[int]
    header: _inference_pb2.FrameHeader
    tile: TileRegion
    region: TileRegion
    halo_token: bytes
    def __init__(self, header: _Optional[_Union[_inference_pb2.FrameHeader, _Mapping]] = ..., tile: _Optional[_Union[TileRegion, _Mapping]] = ..., region: _Optional[_Union[TileRegion, _Mapping]] = ..., halo_token: _Optional[bytes] = ...) -> None: ...

class FetchRegionResult(_message.Message):
    __slots__ = ("part",)
    PART_FIELD_NUMBER: _ClassVar[int]
    part: _tensor_pb2.Tensor
    def __init__(self, part: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class TileResult(_message.Message):
    __slots__ = ("header", "output", "tile", "times", "peer_bytes")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    PEER_BYTES_FIELD_NUMBER: _ClassVar[int]
    header: _inference_pb2.FrameHeader
    output: TileRegion
    tile: _tensor_pb2.Tensor
    times: _inference_pb2.StageTimes
    peer_bytes: int
    def __init__(self, header: _Optional[_Union[_inference_pb2.FrameHeader, _Mapping]] = ..., output: _Optional[_Union[TileRegion, _Mapping]] = ..., tile: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., times: _Optional[_Union[_inference_pb2.StageTimes, _Mapping]] = ..., peer_bytes: _Optional[int] = ...) -> None: ...

class ParallelBlock(_message.Message):
    __slots__ = ("start_split", "end_split", "shares", "predicted_seconds", "grid_cols", "halo_input")
    START_SPLIT_FIELD_NUMBER: _ClassVar[int]
    END_SPLIT_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GRID_COLS_FIELD_NUMBER: _ClassVar[int]
    HALO_INPUT_FIELD_NUMBER: _ClassVar[int]
    start_split: str
    end_split: str
    shares: _containers.RepeatedScalarFieldContainer[float]
    predicted_seconds: float
    grid_cols: int
    halo_input: bool
    def __init__(self, start_split: _Optional[str] = ..., end_split: _Optional[str] = ..., shares: _Optional[_Iterable[float]] = ..., predicted_seconds: _Optional[float] = ..., grid_cols: _Optional[int] = ..., halo_input: _Optional[bool] = ...) -> None: ...

class ParallelStage(_message.Message):
    __slots__ = ("worker_ids", "worker_addresses", "blocks", "codec", "tail_worker_id", "tail_worker_address")
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TAIL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    worker_addresses: _containers.RepeatedScalarFieldContainer[str]
    blocks: _containers.RepeatedCompositeFieldContainer[ParallelBlock]
    codec: str
    tail_worker_id: str
    tail_worker_address: str
    def __init__(self, worker_ids: _Optional[_Iterable[str]] = ..., worker_addresses: _Optional[_Iterable[str]] = ..., blocks: _Optional[_Iterable[_Union[ParallelBlock, _Mapping]]] = ..., codec: _Optional[str] = ..., tail_worker_id: _Optional[str] = ..., tail_worker_address: _Optional[str] = ...) -> None: ...
