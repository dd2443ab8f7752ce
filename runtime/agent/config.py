"""Device agent configuration (defaults < TOML [agent] < EDGESPLIT_AGENT_* < flags)."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime.contracts.config import field
from runtime.contracts.errors import InvalidInput
from runtime.daemon.tracing import TracingSettings
from runtime.wire.security import AGENT, SecuritySettings, certificate_identity
from runtime.wire.transport import TransportOptions

if TYPE_CHECKING:  # annotations only: torch loads when a config is built, not for --help
    from runtime.models.slicing import SplitPoint
    from runtime.transfer.artifact import LoadedTL
    from runtime.wire.chain import Hop
    from runtime.wire.codec import Codec


MIN_CHUNK_CAP = 4 * 1024  # chunk_bytes: the smallest cap a config may set
MESSAGE_ROOM = 64 * 1024  # and what a message keeps for its header beside the payload (max_message_bytes)

_TEXT_CONSTRAINTS = ("pin_blocks", "pin_layers", "forbid_blocks", "max_tier_seconds", "max_tier_share",
                     "max_link_upload_bytes", "max_memory_bytes")  # KEY=VALUE settings, read by runtime.contracts.constraints



def default_agent_id(cert_file: str = "") -> str:
    """The agent's id when none is given: the id of its agent certificate (spiffe://edgesplit/agent/ID),
    which an authenticated worker or planner requires its frames and reports to name; else hostname-pid."""
    found = certificate_identity(cert_file)
    if found is not None and found[0] == AGENT:
        return found[1]
    return f"{socket.gethostname()}-{os.getpid()}"

@dataclass(frozen=True)
class InitialPlan:
    """What the agent is told to run until a plan replaces it (``Agent.apply_plan``)."""

    split: SplitPoint  # where the model is cut: the board runs the head, the worker the tail
    codec: Codec  # wire codec of the head's (or the TL encoder's) output
    worker: str = ""  # edge worker address HOST:PORT; "" runs every frame on the board
    tl: LoadedTL | None = None  # Transfer Layer whose encoder runs after the head (must match model and split)
    version: int = 0  # plan version reported in results and headers; a plan must be newer to replace it
    end_split: str = ""  # where the worker's slice ends (runtime.wire.chain); "" = the worker runs the whole tail
    next_hops: tuple[Hop | str, ...] = ()  # tiers after the worker, in order, as Hop or "ADDRESS[@END_SPLIT]"

    def __post_init__(self) -> None:
        from runtime.wire.jpeg import check_split

        check_split(self.codec, self.split.index, self.split.name)  # InvalidInput: jpeg is for split 0 only


@dataclass(frozen=True)
class AgentOptions:
    """How the agent behaves, whatever plan it runs."""

    agent_id: str = ""  # stable id of this device; "" = hostname-pid
    transport: TransportOptions = dataclasses.field(default_factory=TransportOptions)  # gRPC limits, chunking
    deadline_seconds: float = 2.0  # a frame without an edge result after this long runs locally
    connect_timeout: float = 2.0  # how long to wait for the worker when opening a stream
    reconnect: float = 1.0  # first back-off before reopening a failed stream
    prepare_timeout: float = 60.0  # how long apply_plan waits for the worker's Prepare
    # An edge result whose top-1 softmax margin (p1 - p2) is below this is an ambiguous frame, where
    # a lossy codec or TL is most likely to have flipped the class: the board runs its tail again
    # on the exact head output and that result is used (0: never).
    refine_margin: float = 0.0
    tl_dir: str = ""  # where Transfer Layer ids in plans (or --tl) are resolved
    parallel_halo: bool = True  # a parallel stage's halo blocks exchange halos between workers (False: gather and scatter)
    parallel_halo_early: bool = True  # halo blocks sent once the tiles they read are sent, not answered (early dispatch)

    def __post_init__(self) -> None:
        if not 0.0 <= self.refine_margin <= 1.0:
            raise InvalidInput(f"refine_margin must be in [0, 1] (a softmax probability margin), got {self.refine_margin}")


@dataclass(frozen=True)
class AgentConfig(SecuritySettings, TracingSettings):  # security: runtime.wire.security; trace_*: runtime.daemon.tracing
    worker: str = field("127.0.0.1:50051", "edge worker address HOST:PORT (empty: run every frame locally)")
    model: str = field("efficientnet_lite0", "bundled model name or path/to/file.py:factory")
    split: str = field("", "split point index or name (see 'edgesplit models MODEL'); empty = the model's default")
    codec: str = field("int8+lz4", "wire codec: raw, raw+lz4, fp16, fp16+lz4, int8, int8+lz4; ans with a transform TL; jpeg (jpegQ: quality Q), pixels, pixels+lz4 (lossless) at --split input")
    tl: str = field("", "Transfer Layer artifact (.json from 'edgesplit tl train'): encode after the head; sets the split when --split is empty")
    source: str = field("samples", "frames: samples, synthetic, a folder of PNG/JPEG, a video file, or none (only --serve)")
    frames: int = field(0, "frames to process (0 = one pass over the source; synthetic: 100); finite sources repeat")
    output: str = field("-", "where to write one JSON line per result: a file path, or - for stdout")
    agent_id: str = field("", "stable id of this device (default: the id of its agent certificate, spiffe://edgesplit/agent/ID, else hostname-pid); an authenticated worker or planner accepts only the id of the caller's certificate or token")
    window: int = field(4, "frames in flight on the stream, so board compute overlaps transfer and edge compute")
    fps: float = field(0.0, "pace the source as a camera at this many frames per second: a frame that arrives while --window frames are in flight is dropped and counted (0: as fast as frames finish)")
    deadline_seconds: float = field(2.0, "a frame without an edge result after this long runs locally")
    refine_margin: float = field(0.0, "an edge result whose top-1 softmax margin (p1 - p2) is below this has its tail re-run on the board on the exact head output (0: never); catches the frames a lossy codec or TL flips")
    reconnect_seconds: float = field(1.0, "first back-off before reopening a failed stream (doubles to 2 s, jittered)")
    connect_timeout_seconds: float = field(2.0, "how long to wait for the worker when opening a stream")
    torch_threads: int = field(1, "torch intra-op threads for head and local fallback (0 = torch default)")
    metrics_port: int = field(-1, "Prometheus HTTP port (0 picks a free one, -1 disables)")
    metrics_host: str = field("127.0.0.1", "address the metrics endpoint binds to")
    serve: str = field("", "also serve the local API here (127.0.0.1:PORT or unix:/path.sock) and keep running")
    max_message_bytes: int = field(8 * 2**20, "gRPC message size limit, both directions")
    chunk_bytes: int = field(4 * 2**20, "the most payload bytes per stream message (below the worker's "
                             "max_message_bytes); a measured link gets what it carries in 0.25 s (at least 64 KiB), "
                             "an unmeasured one 256 KiB")
    summary: bool = field(True, "print a latency/bytes summary to stderr at the end")
    planner: str = field("", "planner address HOST:PORT: register, follow its plans, send telemetry (empty: none)")
    profile: str = field("", "device profile JSON of the model on this board ('edgesplit profile'); required with --planner")
    tl_dir: str = field("", "directory where Transfer Layer ids (in plans, or --tl) are resolved")
    telemetry_interval_seconds: float = field(1.0, "at most one telemetry message to the planner per this many seconds")
    telemetry_heartbeat_seconds: float = field(10.0, "a telemetry message at least this often (device compute samples go with it); between heartbeats only when the link estimate leaves +-25 % of the last reported figure or the plan's band (0: one every telemetry_interval_seconds)")
    probe_budget: float = field(0.05, "with --planner: share of a link's estimated capacity that bandwidth probes of links no frame measures may take (0 disables them; at most 0.5)")
    parallel_halo: bool = field(True, "a parallel stage (pushed by the planner, or --parallel-plan) whose blocks take their input by halo exchange has its workers exchange the border rows with one another; --no-parallel-halo: every block gathered and scattered by the agent instead (same result; more bytes through the agent)")
    parallel_halo_early: bool = field(True, "early dispatch: a halo block's tiles go to the workers once the tiles they read are sent (the workers wait for them), not once those have answered; --no-parallel-halo-early: after the answers, one round through the agent per block (it also turns itself off after a worker older than early dispatch misses a tile)")
    planner_workers: tuple[str, ...] = field((), "worker ids the planner may assign (empty: any that serves the model)")
    raw_input_stays: bool = field(False, "plans must run at least the first block here: raw frames never leave the board")
    min_fidelity: float = field(0.0, "plans use only Transfer Layers with measured top-1 agreement >= this (0: any)")
    max_upload_bytes: int = field(0, "plans send at most this many bytes per frame (0: no cap)")
    max_device_seconds: float = field(0.0, "plans keep device compute per frame under this (0: no cap)")
    objective: str = field("latency", "what plans optimise: latency, or throughput (frames pipelined)")
    device_memory_bytes: int = field(0, "plans keep at most this many bytes of weights on the device (0: no cap)")
    planner_exclude_workers: tuple[str, ...] = field((), "worker ids the planner must never assign")
    pin_blocks: tuple[str, ...] = field((), "BLOCK=TIER (index or name; tiers: device, edge, cloud): plans run it there")
    pin_layers: tuple[str, ...] = field((), "LAYER=TIER: plans run the block holding that profile layer on TIER")
    forbid_blocks: tuple[str, ...] = field((), "BLOCK=TIER (block index or name): plans never run that block on TIER")
    max_tier_seconds: tuple[str, ...] = field((), "TIER=SECONDS: cap on a tier's time per frame (compute + encode/decode)")
    max_tier_share: tuple[str, ...] = field((), "TIER=SHARE: cap on a tier's share of the end-to-end latency, in (0, 1]")
    max_link_upload_bytes: tuple[str, ...] = field((), "TIER=BYTES: cap on bytes the tier sends per frame over its link")
    max_memory_bytes: tuple[str, ...] = field((), "TIER=BYTES: cap on the weights a tier holds")
    # worker chaining (device -> edge -> cloud): the worker runs a middle slice and forwards the rest
    end_split: str = field("", "where the worker's slice ends; it forwards the rest to its next tier (empty: the worker runs the whole tail)")
    next_hops: tuple[str, ...] = field((), "tiers after the worker, in order, as ADDRESS or ADDRESS@END_SPLIT (each in the previous worker's --next-tier; none: the worker's first)")
    forward_codec: str = field("", "codec of the tensors the workers forward along the chain (empty: each worker's --forward-codec)")

    def __post_init__(self) -> None:
        if self.planner and not self.profile:
            raise InvalidInput("planner is set but profile is not: give the device profile JSON of this model on "
                               "this board (--profile, written by 'edgesplit profile')")
        if self.objective not in ("latency", "throughput"):
            raise InvalidInput(f"objective must be latency or throughput, got {self.objective!r}")
        if not 0.0 <= self.min_fidelity <= 1.0 or self.max_upload_bytes < 0 or self.max_device_seconds < 0:
            raise InvalidInput("min_fidelity must be in [0, 1]; max_upload_bytes and max_device_seconds must be >= 0")
        if not 0.0 <= self.refine_margin <= 1.0:
            raise InvalidInput(f"refine_margin must be in [0, 1] (a softmax probability margin), got {self.refine_margin}")
        if self.next_hops and not self.end_split:
            raise InvalidInput("next_hops is set but end_split is not: give --end-split, where the worker's slice ends")
        if self.forward_codec:
            from runtime.wire.codec import get_codec

            get_codec(self.forward_codec)  # InvalidInput with the valid names
        if not self.telemetry_interval_seconds > 0:
            raise InvalidInput(f"telemetry_interval_seconds must be > 0, got {self.telemetry_interval_seconds!r}")
        if not self.telemetry_heartbeat_seconds >= 0:
            raise InvalidInput(f"telemetry_heartbeat_seconds must be >= 0 (0: every interval), got "
                               f"{self.telemetry_heartbeat_seconds!r}")
        if not (0 <= self.fps <= 1000 and math.isfinite(self.fps)):
            raise InvalidInput(f"fps must be in [0, 1000] frames per second (0: unpaced), got {self.fps!r}")
        if not 0 <= self.probe_budget <= 0.5:
            raise InvalidInput(f"probe_budget must be in [0, 0.5] (a share of the link), got {self.probe_budget!r}")
        if self.device_memory_bytes < 0:
            raise InvalidInput(f"device_memory_bytes must be >= 0 (0: no cap), got {self.device_memory_bytes}")
        if not MIN_CHUNK_CAP <= self.chunk_bytes <= self.max_message_bytes - MESSAGE_ROOM:
            raise InvalidInput(f"chunk_bytes must be {MIN_CHUNK_CAP}..{self.max_message_bytes - MESSAGE_ROOM} (max_message_bytes "
                               f"{self.max_message_bytes} less {MESSAGE_ROOM} for a frame's header), got {self.chunk_bytes}")
        from runtime.contracts.constraints import check_fields
        from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

        check_fields(ppb.Constraints(**self.constraints()))  # what needs no profile; the planner checks the blocks

    def constraints(self) -> dict:
        """The plan constraints sent to the planner (planner.proto Constraints)."""
        from runtime.contracts.constraints import from_text

        text = from_text(**{k: getattr(self, k) for k in _TEXT_CONSTRAINTS})
        return {"raw_input_stays": self.raw_input_stays, "min_fidelity": self.min_fidelity,
                "max_upload_bytes": self.max_upload_bytes, "max_device_seconds": self.max_device_seconds,
                "device_memory_bytes": self.device_memory_bytes, "objective": self.objective,
                "exclude_workers": list(self.planner_exclude_workers), **text}

    def transport(self) -> TransportOptions:
        return TransportOptions(max_message_bytes=self.max_message_bytes, chunk_bytes=self.chunk_bytes,
                                security=self.security())

    def agent_options(self) -> AgentOptions:
        return AgentOptions(agent_id=self.agent_id, transport=self.transport(), deadline_seconds=self.deadline_seconds,
                            connect_timeout=self.connect_timeout_seconds, reconnect=self.reconnect_seconds,
                            refine_margin=self.refine_margin, tl_dir=self.tl_dir, parallel_halo=self.parallel_halo,
                            parallel_halo_early=self.parallel_halo_early)
