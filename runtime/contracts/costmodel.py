"""The cost model's vocabulary: tiers, links, constraints, and a ranked configuration.

End-to-end latency of a configuration (Scission's model, with ScissionLite's Transfer Layer and
our codecs as per-cut transfer choices):

    sum over non-empty tiers of their block times
  + for every link crossed: sender encode + RTT + bytes / bandwidth + receiver decode
  + (optionally) the result's bytes / bandwidth on its way back over the same links

The device is where frames start: when it runs no block it still sends the raw input. Throughput
when frames are pipelined is 1 / the slowest stage (a tier's compute with its encode and decode,
or a link's bytes / bandwidth).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Profile, Transfer

OBJECTIVES = ("latency", "throughput")


@dataclass(frozen=True)
class Link:
    rtt_seconds: float
    bandwidth_bytes_per_second: float  # Mbit/s x 125,000

    def __post_init__(self) -> None:
        if not (self.rtt_seconds >= 0 and self.bandwidth_bytes_per_second > 0):
            raise InvalidInput(f"a link needs RTT >= 0 and bandwidth > 0, got {self.rtt_seconds} s, "
                               f"{self.bandwidth_bytes_per_second} B/s")

    @classmethod
    def from_mbps(cls, rtt_ms: float, mbps: float) -> Link:
        return cls(rtt_ms / 1e3, mbps * 125_000.0)


@dataclass(frozen=True)
class Network:
    """Links keyed by (sender, receiver): machine names, or tier names as a fallback for any machine."""

    links: Mapping[tuple[str, str], Link]

    def link(self, src_machine: str, dst_machine: str, src_tier: str = "", dst_tier: str = "") -> Link:
        for key in ((src_machine, dst_machine), (dst_machine, src_machine), (src_tier, dst_tier), (dst_tier, src_tier)):
            if key in self.links:
                return self.links[key]
        raise InvalidInput(f"the network description has no link between {src_machine} ({src_tier}) and "
                           f"{dst_machine} ({dst_tier})")


@dataclass(frozen=True)
class Tier:
    """One tier (device, edge, cloud ...) and the machines that may serve it (one profile each)."""

    name: str
    profiles: tuple[Profile, ...]
    required: bool = False  # must run at least one block


@dataclass(frozen=True)
class Constraints:
    """Scission's constraints, plus a fidelity floor and memory caps. Tier names key the dicts."""

    pin_blocks: Mapping[int, str] = field(default_factory=dict)  # block -> the tier that must run it
    forbid_blocks: Mapping[int, frozenset[str]] = field(default_factory=dict)  # block -> tiers that must not
    raw_input_stays: bool = False  # the device runs block 0 (the raw input never leaves the board)
    max_upload_bytes: Mapping[str, int] = field(default_factory=dict)  # sending tier -> bytes per frame
    max_tier_seconds: Mapping[str, float] = field(default_factory=dict)  # tier -> compute s per frame
    max_tier_share: Mapping[str, float] = field(default_factory=dict)  # tier -> share of the total latency
    max_memory_bytes: Mapping[str, int] = field(default_factory=dict)  # tier -> weights it holds
    include_machines: frozenset[str] = frozenset()  # if set, only these machines
    exclude_machines: frozenset[str] = frozenset()
    min_fidelity: float = 0.0  # Transfer Layers below this (or unmeasured) are not used; codecs always are


def pin_layers(profile: Profile, layers: Mapping[int, str]) -> dict[int, str]:
    """Scission-style layer pins (layer index -> tier) as block pins, via first/last_layer."""
    out: dict[int, str] = {}
    for layer, tier in layers.items():
        for b in profile.blocks:
            if b.first_layer <= layer <= b.last_layer:
                out[b.index] = tier
                break
        else:
            raise InvalidInput(f"no block of {profile.model} on {profile.machine} holds layer {layer}")
    return out


@dataclass(frozen=True)
class Stage:
    tier: str
    machine: str
    first_block: int
    end_block: int  # exclusive
    compute_seconds: float  # block times only
    seconds: float  # with the encode/decode this machine does for its links


@dataclass(frozen=True)
class Hop:
    src_tier: str
    src_machine: str
    dst_tier: str
    dst_machine: str
    cut: int  # blocks run before this hop (0 = the raw input crosses)
    split: str  # split point name of the cut ("input" for 0)
    transfer: Transfer
    encode_seconds: float
    rtt_seconds: float
    transfer_seconds: float  # bytes / bandwidth
    decode_seconds: float
    return_seconds: float  # result bytes / bandwidth on the way back (0 when not modelled)


@dataclass(frozen=True)
class Configuration:
    seconds: float  # predicted end-to-end latency per frame
    fps: float  # predicted throughput with frames pipelined
    stages: tuple[Stage, ...]  # non-empty tiers, in order
    hops: tuple[Hop, ...]
    objective: str = "latency"

    @property
    def upload_bytes(self) -> int:
        """Bytes sent per frame over all links (Scission's figure)."""
        return sum(h.transfer.bytes for h in self.hops)

    @property
    def device_blocks(self) -> int:
        return self.stages[0].end_block if self.stages and self.stages[0].tier == self.device_tier else 0

    @property
    def device_tier(self) -> str:
        return self.hops[0].src_tier if self.hops else (self.stages[0].tier if self.stages else "")

    def breakdown(self) -> dict[str, float]:
        """Seconds by part: compute per tier, then encode/transfer/decode per link."""
        out: dict[str, float] = {}
        for s in self.stages:
            out[f"compute:{s.tier}"] = s.compute_seconds
        for h in self.hops:
            link = f"{h.src_tier}->{h.dst_tier}"
            out[f"encode:{link}"] = h.encode_seconds
            out[f"rtt:{link}"] = h.rtt_seconds
            out[f"transfer:{link}"] = h.transfer_seconds
            out[f"decode:{link}"] = h.decode_seconds
            if h.return_seconds:
                out[f"return:{link}"] = h.return_seconds
        return out

    def describe(self) -> str:
        parts = [f"{s.tier}({s.machine})=" + (f"blocks {s.first_block}-{s.end_block - 1}" if s.end_block > s.first_block
                                              else "no blocks") for s in self.stages]
        via = ", ".join(f"{h.split}:{h.transfer.name}" for h in self.hops)
        return "; ".join(parts) + (f" via {via}" if via else "")
