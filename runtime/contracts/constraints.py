"""The wire ``Constraints`` (planner.proto): their checks, and the search's :class:`Constraints` they map to.

:func:`check_fields` checks what needs no profile (tier names, numbers, that every block entry
names a block), so an agent can refuse a bad setting at start; :func:`resolve` checks the rest
against the agent's device profile (block indices, names and layers; contradictory pins and
forbids) and returns the search's constraints. Every fault raises
:class:`runtime.contracts.errors.InvalidInput` (INVALID_ARGUMENT on the wire) with a message a person can
act on. Workers included or excluded are not mapped: the planner applies them when it picks the
candidate workers (the search would read them as machine names, the device's too).

:func:`from_text` turns the ``KEY=VALUE`` settings of the agent's configuration and of
``edgesplit planner query`` (the same spelling as ``edgesplit plan``'s flags) into wire fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from runtime.contracts.costmodel import OBJECTIVES, Constraints
from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Profile
from runtime.contracts.tiers import CLOUD, DEVICE, EDGE, TIERS
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

MAX_PLACEMENTS = 4096  # pins or forbids one message may carry

_Number = TypeVar("_Number", int, float)  # a cap: bytes (int) or seconds and shares (float)


def _tier(value: str, what: str) -> str:
    if value not in TIERS:
        raise InvalidInput(f"{what} {value[:40]!r} is not a tier: use one of {', '.join(TIERS)}")
    return value


def check_fields(c: pb.Constraints) -> None:
    """Everything about ``c`` that needs no profile."""
    if not (0.0 <= c.min_fidelity <= 1.0):
        raise InvalidInput(f"constraints.min_fidelity is top-1 agreement in [0, 1], not {c.min_fidelity}")
    if not (math.isfinite(c.max_device_seconds) and c.max_device_seconds >= 0):
        raise InvalidInput(f"constraints.max_device_seconds must be a finite number >= 0 (0: no cap), "
                           f"not {c.max_device_seconds}")
    if c.objective not in ("", *OBJECTIVES):
        raise InvalidInput(f"constraints.objective must be 'latency' or 'throughput', not {c.objective[:40]!r}")
    for field in ("pin_blocks", "forbid_blocks"):
        entries = getattr(c, field)
        if len(entries) > MAX_PLACEMENTS:
            raise InvalidInput(f"constraints.{field} holds {len(entries)} entries, more than the {MAX_PLACEMENTS} "
                               "one message may carry")
        for i, e in enumerate(entries):
            if e.WhichOneof("block") is None:
                raise InvalidInput(f"constraints.{field}[{i}] names no block: set its index, name or layer")
            if e.WhichOneof("block") == "name" and not e.name:
                raise InvalidInput(f"constraints.{field}[{i}].name is empty: give the block's name in the profile")
            _tier(e.tier, f"constraints.{field}[{i}].tier")
    for tier, s in c.max_tier_seconds.items():
        _tier(tier, "constraints.max_tier_seconds: key")
        if not (math.isfinite(s) and s > 0):
            raise InvalidInput(f"constraints.max_tier_seconds[{tier}] must be a finite number of seconds > 0, not {s} "
                               "(leave the tier out for no cap)")
    for tier, share in c.max_tier_share.items():
        _tier(tier, "constraints.max_tier_share: key")
        if not (0.0 < share <= 1.0):
            raise InvalidInput(f"constraints.max_tier_share[{tier}] is a share of the end-to-end latency in (0, 1], "
                               f"not {share}")
    for field in ("max_link_upload_bytes", "max_memory_bytes"):
        for tier, n in getattr(c, field).items():
            _tier(tier, f"constraints.{field}: key")
            if n == 0:
                raise InvalidInput(f"constraints.{field}[{tier}] is 0: give a cap in bytes > 0, or leave the tier "
                                   "out for no cap")
    both = set(c.include_workers) & set(c.exclude_workers)
    if both:
        raise InvalidInput(f"constraints include and exclude the same workers {sorted(both)}: name each in one list")


def _block(e: pb.BlockTier, device: Profile, what: str) -> int:
    """The block index a pin or forbid names."""
    n = device.n_blocks
    kind = e.WhichOneof("block")
    if kind == "index":
        if e.index >= n:
            raise InvalidInput(f"{what}: block {e.index} is out of range: {device.model}'s profile has {n} blocks "
                               f"(0-{n - 1})")
        return e.index
    if kind == "name":
        for b in device.blocks:
            if b.name == e.name:
                return b.index
        names = [b.name for b in device.blocks]
        shown = ", ".join(names[:8]) + (f", ... ({n} in all)" if n > 8 else "")
        raise InvalidInput(f"{what}: {device.model}'s profile has no block named {e.name[:80]!r} (its blocks: {shown})")
    for b in device.blocks:
        if b.first_layer <= e.layer <= b.last_layer:
            return b.index
    raise InvalidInput(f"{what}: no block of {device.model}'s profile holds layer {e.layer} (the profile's "
                       "first_layer..last_layer; pin by block index or name instead)")


def _label(device: Profile, b: int) -> str:
    return f"block {b} ({device.blocks[b].name})"


def resolve(c: pb.Constraints, device: Profile) -> Constraints:
    """``c``, checked against the agent's device profile, as the search's constraints."""
    check_fields(c)
    pins: dict[int, str] = {}
    for i, e in enumerate(c.pin_blocks):
        b = _block(e, device, f"constraints.pin_blocks[{i}]")
        if pins.get(b, e.tier) != e.tier:
            raise InvalidInput(f"{_label(device, b)} is pinned to both {pins[b]} and {e.tier}: pin it to one tier")
        pins[b] = e.tier
    forbid: dict[int, frozenset[str]] = {}
    for i, e in enumerate(c.forbid_blocks):
        b = _block(e, device, f"constraints.forbid_blocks[{i}]")
        if pins.get(b) == e.tier:
            raise InvalidInput(f"{_label(device, b)} is pinned to {e.tier} and forbidden on {e.tier}: drop one of the two")
        forbid[b] = forbid.get(b, frozenset()) | {e.tier}
        if forbid[b] == frozenset(TIERS):
            raise InvalidInput(f"{_label(device, b)} is forbidden on every tier ({', '.join(TIERS)}): no plan can run it")
    if c.raw_input_stays and device.n_blocks:
        if pins.get(0, DEVICE) != DEVICE:
            raise InvalidInput(f"raw_input_stays keeps {_label(device, 0)} on the device, but it is pinned to {pins[0]}: "
                               "drop the pin or raw_input_stays")
        if DEVICE in forbid.get(0, ()):
            raise InvalidInput(f"raw_input_stays keeps {_label(device, 0)} on the device, but it is forbidden there: "
                               "drop the forbid or raw_input_stays")
    last = None
    for b in sorted(pins):  # a plan's tiers run blocks in the order device, edge, cloud
        if last is not None and TIERS.index(pins[b]) < TIERS.index(pins[last]):
            raise InvalidInput(f"{_label(device, b)} is pinned to {pins[b]} but the earlier {_label(device, last)} to "
                               f"{pins[last]}: frames cross the tiers in the order {', '.join(TIERS)}, so no plan "
                               "honours both")
        last = b
    if {EDGE, CLOUD} <= set(pins.values()):
        raise InvalidInput("blocks are pinned to both edge and cloud, but a plan runs on the device and one worker: "
                           "pin blocks to one worker tier")

    def merged(table: Mapping[str, _Number], device_cap: _Number) -> dict[str, _Number]:
        out = dict(table)
        if device_cap:
            out[DEVICE] = min(out.get(DEVICE, device_cap), device_cap)
        return out

    return Constraints(
        pin_blocks=pins, forbid_blocks=forbid, raw_input_stays=c.raw_input_stays, min_fidelity=c.min_fidelity,
        max_upload_bytes=merged(c.max_link_upload_bytes, c.max_upload_bytes),
        max_tier_seconds=merged(c.max_tier_seconds, c.max_device_seconds),
        max_tier_share=dict(c.max_tier_share),
        max_memory_bytes=merged(c.max_memory_bytes, c.device_memory_bytes))


# -- text settings ---------------------------------------------------------------------------------


def _pairs(values: Iterable[str], setting: str, form: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise InvalidInput(f"{setting} takes {form}, got {v!r}")
        out.append((key.strip(), val.strip()))
    return out


def _placements(values: Iterable[str], setting: str, layers: bool = False) -> list[dict]:
    out = []
    for key, tier in _pairs(values, setting, "LAYER=TIER" if layers else "BLOCK=TIER (a block index or name)"):
        _tier(tier, f"{setting} {key}={tier}:")
        if layers or key.isdigit():
            if not key.isdigit():
                raise InvalidInput(f"{setting} takes LAYER=TIER with a layer index >= 0, got {key}={tier}")
            out.append({"layer" if layers else "index": int(key), "tier": tier})
        else:
            out.append({"name": key, "tier": tier})
    return out


def _table(values: Iterable[str], setting: str, unit: str, conv: Callable[[str], _Number]) -> dict[str, _Number]:
    out: dict[str, _Number] = {}
    for tier, val in _pairs(values, setting, f"TIER={unit}"):
        _tier(tier, f"{setting} {tier}={val}:")
        if tier in out:
            raise InvalidInput(f"{setting} names tier {tier} twice")
        try:
            out[tier] = conv(val)
        except ValueError:
            raise InvalidInput(f"{setting} {tier}={val}: {val!r} is not a number of {unit.lower()}") from None
        if out[tier] < 0:
            raise InvalidInput(f"{setting} {tier}={val}: a cap must be > 0")
    return out


def from_text(*, pin_blocks: Iterable[str] = (), pin_layers: Iterable[str] = (), forbid_blocks: Iterable[str] = (),
              max_tier_seconds: Iterable[str] = (), max_tier_share: Iterable[str] = (),
              max_link_upload_bytes: Iterable[str] = (), max_memory_bytes: Iterable[str] = (),
              names: dict[str, str] | None = None) -> dict:
    """Wire fields (keyword arguments of ``pb.Constraints``) from ``KEY=VALUE`` settings; ``names`` maps
    each argument to the setting's name in messages (e.g. its flag)."""
    labels = names or {}

    def n(key: str) -> str:
        return labels.get(key, key)

    return {
        "pin_blocks": _placements(pin_blocks, n("pin_blocks")) + _placements(pin_layers, n("pin_layers"), layers=True),
        "forbid_blocks": _placements(forbid_blocks, n("forbid_blocks")),
        "max_tier_seconds": _table(max_tier_seconds, n("max_tier_seconds"), "SECONDS", float),
        "max_tier_share": _table(max_tier_share, n("max_tier_share"), "SHARE", float),
        "max_link_upload_bytes": _table(max_link_upload_bytes, n("max_link_upload_bytes"), "BYTES", int),
        "max_memory_bytes": _table(max_memory_bytes, n("max_memory_bytes"), "BYTES", int),
    }
