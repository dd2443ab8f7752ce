from runtime.proto.edgesplit.v1 import tiles_pb2 as _tiles_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "address", "tier", "profiles_json", "tl_ids", "next_tiers", "leaving")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PROFILES_JSON_FIELD_NUMBER: _ClassVar[int]
    TL_IDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TIERS_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    tier: str
    profiles_json: _containers.RepeatedScalarFieldContainer[str]
    tl_ids: _containers.RepeatedScalarFieldContainer[str]
    next_tiers: _containers.RepeatedScalarFieldContainer[str]
    leaving: bool
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., tier: _Optional[str] = ..., profiles_json: _Optional[_Iterable[str]] = ..., tl_ids: _Optional[_Iterable[str]] = ..., next_tiers: _Optional[_Iterable[str]] = ..., leaving: _Optional[bool] = ...) -> None: ...

class RegisterWorkerReply(_message.Message):
    __slots__ = ("profiles",)
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    profiles: int
    def __init__(self, profiles: _Optional[int] = ...) -> None: ...

class BlockTier(_message.Message):
    __slots__ = ("index", "name", "layer", "tier")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    layer: int
    tier: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., layer: _Optional[int] = ..., tier: _Optional[str] = ...) -> None: ...

class Constraints(_message.Message):
    __slots__ = ("raw_input_stays", "min_fidelity", "max_upload_bytes", "max_device_seconds", "device_memory_bytes", "objective", "exclude_workers", "include_workers", "pin_blocks", "forbid_blocks", "max_tier_seconds", "max_tier_share", "max_link_upload_bytes", "max_memory_bytes")
    class MaxTierSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MaxTierShareEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MaxLinkUploadBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class MaxMemoryBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RAW_INPUT_STAYS_FIELD_NUMBER: _ClassVar[int]
    MIN_FIDELITY_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DEVICE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PIN_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FORBID_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_TIER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TIER_SHARE_FIELD_NUMBER: _ClassVar[int]
    MAX_LINK_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    raw_input_stays: bool
    min_fidelity: float
    max_upload_bytes: int
    max_device_seconds: float
    device_memory_bytes: int
    objective: str
    exclude_workers: _containers.RepeatedScalarFieldContainer[str]
    include_workers: _containers.RepeatedScalarFieldContainer[str]
    pin_blocks: _containers.RepeatedCompositeFieldContainer[BlockTier]
    forbid_blocks: _containers.RepeatedCompositeFieldContainer[BlockTier]
    max_tier_seconds: _containers.ScalarMap[str, float]
    max_tier_share: _containers.ScalarMap[str, float]
    max_link_upload_bytes: _containers.ScalarMap[str, int]
    max_memory_bytes: _containers.ScalarMap[str, int]
    def __init__(self, raw_input_stays: _Optional[bool] = ..., min_fidelity: _Optional[float] = ..., max_upload_bytes: _Optional[int] = ..., max_device_seconds: _Optional[float] = ..., device_memory_bytes: _Optional[int] = ..., objective: _Optional[str] = ..., exclude_workers: _Optional[_Iterable[str]] = ..., include_workers: _Optional[_Iterable[str]] = ..., pin_blocks: _Optional[_Iterable[_Union[BlockTier, _Mapping]]] = ..., forbid_blocks: _Optional[_Iterable[_Union[BlockTier, _Mapping]]] = ..., max_tier_seconds: _Optional[_Mapping[str, float]] = ..., max_tier_share: _Optional[_Mapping[str, float]] = ..., max_link_upload_bytes: _Optional[_Mapping[str, int]] = ..., max_memory_bytes: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RegisterAgentRequest(_message.Message):
    __slots__ = ("agent_id", "model_id", "model_digest", "profile_json", "workers", "tl_ids", "constraints", "profile_sha256")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TL_IDS_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    model_id: str
    model_digest: str
    profile_json: str
    workers: _containers.RepeatedScalarFieldContainer[str]
    tl_ids: _containers.RepeatedScalarFieldContainer[str]
    constraints: Constraints
    profile_sha256: str
    def __init__(self, agent_id: _Optional[str] = ..., model_id: _Optional[str] = ..., model_digest: _Optional[str] = ..., profile_json: _Optional[str] = ..., workers: _Optional[_Iterable[str]] = ..., tl_ids: _Optional[_Iterable[str]] = ..., constraints: _Optional[_Union[Constraints, _Mapping]] = ..., profile_sha256: _Optional[str] = ...) -> None: ...

class RegisterAgentReply(_message.Message):
    __slots__ = ("plan",)
    PLAN_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("agent_id", "worker", "bandwidth_bytes_per_second", "rtt_seconds", "stage_seconds", "frames", "plan_version", "sent_unix", "bandwidth_age_seconds", "bandwidth_samples", "other_links", "wire")
    class StageSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    OTHER_LINKS_FIELD_NUMBER: _ClassVar[int]
    WIRE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    worker: str
    bandwidth_bytes_per_second: float
    rtt_seconds: float
    stage_seconds: _containers.ScalarMap[str, float]
    frames: int
    plan_version: int
    sent_unix: float
    bandwidth_age_seconds: float
    bandwidth_samples: int
    other_links: _containers.RepeatedCompositeFieldContainer[LinkReport]
    wire: _containers.RepeatedCompositeFieldContainer[WireReport]
    def __init__(self, agent_id: _Optional[str] = ..., worker: _Optional[str] = ..., bandwidth_bytes_per_second: _Optional[float] = ..., rtt_seconds: _Optional[float] = ..., stage_seconds: _Optional[_Mapping[str, float]] = ..., frames: _Optional[int] = ..., plan_version: _Optional[int] = ..., sent_unix: _Optional[float] = ..., bandwidth_age_seconds: _Optional[float] = ..., bandwidth_samples: _Optional[int] = ..., other_links: _Optional[_Iterable[_Union[LinkReport, _Mapping]]] = ..., wire: _Optional[_Iterable[_Union[WireReport, _Mapping]]] = ...) -> None: ...

class WireReport(_message.Message):
    __slots__ = ("split_id", "codec", "mean_bytes", "encode_seconds", "samples", "age_seconds")
    SPLIT_ID_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    MEAN_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    split_id: str
    codec: str
    mean_bytes: float
    encode_seconds: float
    samples: int
    age_seconds: float
    def __init__(self, split_id: _Optional[str] = ..., codec: _Optional[str] = ..., mean_bytes: _Optional[float] = ..., encode_seconds: _Optional[float] = ..., samples: _Optional[int] = ..., age_seconds: _Optional[float] = ...) -> None: ...

class LinkReport(_message.Message):
    __slots__ = ("worker", "bandwidth_bytes_per_second", "rtt_seconds", "bandwidth_age_seconds", "bandwidth_samples")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    worker: str
    bandwidth_bytes_per_second: float
    rtt_seconds: float
    bandwidth_age_seconds: float
    bandwidth_samples: int
    def __init__(self, worker: _Optional[str] = ..., bandwidth_bytes_per_second: _Optional[float] = ..., rtt_seconds: _Optional[float] = ..., bandwidth_age_seconds: _Optional[float] = ..., bandwidth_samples: _Optional[int] = ...) -> None: ...

class ProbeTargetsRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class ProbeTarget(_message.Message):
    __slots__ = ("worker_id", "address", "bandwidth_bytes_per_second", "age_seconds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    bandwidth_bytes_per_second: float
    age_seconds: float
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., bandwidth_bytes_per_second: _Optional[float] = ..., age_seconds: _Optional[float] = ...) -> None: ...

class ProbeTargetsReply(_message.Message):
    __slots__ = ("targets", "link_ttl_seconds")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    LINK_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[ProbeTarget]
    link_ttl_seconds: float
    def __init__(self, targets: _Optional[_Iterable[_Union[ProbeTarget, _Mapping]]] = ..., link_ttl_seconds: _Optional[float] = ...) -> None: ...

class TelemetryAck(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("agent_id", "version", "model_id", "split_id", "split_index", "codec", "tl_id", "worker_id", "worker_address", "predicted_seconds", "predicted_fps", "predicted_bytes", "breakdown_seconds", "reason", "created_unix", "end_split", "end_split_index", "next_hops", "parallel", "fallbacks", "band_worker_address")
    class BreakdownSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TL_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FPS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BREAKDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    END_SPLIT_FIELD_NUMBER: _ClassVar[int]
    END_SPLIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOPS_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    BAND_WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    version: int
    model_id: str
    split_id: str
    split_index: int
    codec: str
    tl_id: str
    worker_id: str
    worker_address: str
    predicted_seconds: float
    predicted_fps: float
    predicted_bytes: int
    breakdown_seconds: _containers.ScalarMap[str, float]
    reason: str
    created_unix: float
    end_split: str
    end_split_index: int
    next_hops: _containers.RepeatedCompositeFieldContainer[PlanHop]
    parallel: _tiles_pb2.ParallelStage
    fallbacks: _containers.RepeatedCompositeFieldContainer[BandPlan]
    band_worker_address: str
    def __init__(self, agent_id: _Optional[str] = ..., version: _Optional[int] = ..., model_id: _Optional[str] = ..., split_id: _Optional[str] = ..., split_index: _Optional[int] = ..., codec: _Optional[str] = ..., tl_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., worker_address: _Optional[str] = ..., predicted_seconds: _Optional[float] = ..., predicted_fps: _Optional[float] = ..., predicted_bytes: _Optional[int] = ..., breakdown_seconds: _Optional[_Mapping[str, float]] = ..., reason: _Optional[str] = ..., created_unix: _Optional[float] = ..., end_split: _Optional[str] = ..., end_split_index: _Optional[int] = ..., next_hops: _Optional[_Iterable[_Union[PlanHop, _Mapping]]] = ..., parallel: _Optional[_Union[_tiles_pb2.ParallelStage, _Mapping]] = ..., fallbacks: _Optional[_Iterable[_Union[BandPlan, _Mapping]]] = ..., band_worker_address: _Optional[str] = ...) -> None: ...

class BandPlan(_message.Message):
    __slots__ = ("min_bandwidth_bytes_per_second", "max_bandwidth_bytes_per_second", "plan")
    MIN_BANDWIDTH_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MAX_BANDWIDTH_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    min_bandwidth_bytes_per_second: float
    max_bandwidth_bytes_per_second: float
    plan: Plan
    def __init__(self, min_bandwidth_bytes_per_second: _Optional[float] = ..., max_bandwidth_bytes_per_second: _Optional[float] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ...) -> None: ...

class PlanHop(_message.Message):
    __slots__ = ("worker_id", "address", "end_split", "end_split_index", "codec", "tl_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    END_SPLIT_FIELD_NUMBER: _ClassVar[int]
    END_SPLIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TL_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    end_split: str
    end_split_index: int
    codec: str
    tl_id: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., end_split: _Optional[str] = ..., end_split_index: _Optional[int] = ..., codec: _Optional[str] = ..., tl_id: _Optional[str] = ...) -> None: ...

class WatchPlanRequest(_message.Message):
    __slots__ = ("agent_id", "known_version")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    known_version: int
    def __init__(self, agent_id: _Optional[str] = ..., known_version: _Optional[int] = ...) -> None: ...

class PlanStatus(_message.Message):
    __slots__ = ("agent_id", "version", "applied", "message")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    version: int
    applied: bool
    message: str
    def __init__(self, agent_id: _Optional[str] = ..., version: _Optional[int] = ..., applied: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class PlanStatusAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlanQuery(_message.Message):
    __slots__ = ("agent_id", "bandwidth_bytes_per_second", "rtt_seconds", "top_n", "constraints")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    bandwidth_bytes_per_second: float
    rtt_seconds: float
    top_n: int
    constraints: Constraints
    def __init__(self, agent_id: _Optional[str] = ..., bandwidth_bytes_per_second: _Optional[float] = ..., rtt_seconds: _Optional[float] = ..., top_n: _Optional[int] = ..., constraints: _Optional[_Union[Constraints, _Mapping]] = ...) -> None: ...

class PlanQueryReply(_message.Message):
    __slots__ = ("candidates", "decision_seconds")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DECISION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Plan]
    decision_seconds: float
    def __init__(self, candidates: _Optional[_Iterable[_Union[Plan, _Mapping]]] = ..., decision_seconds: _Optional[float] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("agent_id", "model_id", "plan", "bandwidth_bytes_per_second", "rtt_seconds", "telemetry_age_seconds", "refused_version", "refused_message")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RTT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REFUSED_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    model_id: str
    plan: Plan
    bandwidth_bytes_per_second: float
    rtt_seconds: float
    telemetry_age_seconds: float
    refused_version: int
    refused_message: str
    def __init__(self, agent_id: _Optional[str] = ..., model_id: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., bandwidth_bytes_per_second: _Optional[float] = ..., rtt_seconds: _Optional[float] = ..., telemetry_age_seconds: _Optional[float] = ..., refused_version: _Optional[int] = ..., refused_message: _Optional[str] = ...) -> None: ...

class ListAgentsReply(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ...) -> None: ...
