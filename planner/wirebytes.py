"""Transfers priced with what the agent measured: bytes per frame and the board's encode time (issue 11).

A device profile's transfer bytes are those of its calibration inputs, and its encode times the
profiling machine's. The agent reports, per (split, codec) it sent, the smoothed bytes per frame and the
median encode time on the board, with sample count and age (Telemetry.wire, runtime.agent.wirebytes).
:class:`WireFigures` keeps them per agent; :func:`patched` gives the device profile with those transfers
re-priced, the rest as profiled:

* bytes: the transfer at that split's cut with that codec, and the Transfer Layer of the plan the agent
  ran it under (``tl_id``, resolved when the report arrives; "" for none);
* encode: the same transfer's ``encode_seconds`` when no Transfer Layer is involved (with one, the
  agent times the TL encoder apart, ``tl_encode``, and the profile's figure stays);
* the same codec at another quality (``jpeg50`` beside a measured ``jpeg40``: one family, the name less its
  trailing digits), at the same cut and TL, never sent: its profile bytes scaled by the measured / profiled ratio of
  the family's nearest measured quality. A photo's JPEG says little of the board's frames at any quality: priced as
  profiled, each unsent quality looked cheaper than the measured one (MobileNetV2's noise frames 12.9 KB at q40
  against the profile's 5.4 KB, q75 3.6-10.5 KB in the profile), so at 0.1 Mbit/s the planner moved up one quality
  at a time as each was measured, and a frame at q75 (24 KB) missed its deadline (the dynamic trace, 2026-12-05);
* a figure counts from ``MIN_SAMPLES`` frames; one older than ``TTL_SECONDS`` is forgotten and the
  profile stands again; the profile decisions use is remade only when a figure moved by more than
  ``TOLERANCE`` from the one it was made with (every remake empties the search's table cache).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import Profile, Transfer
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

MAX_REPORTS = 64  # Telemetry.wire entries accepted per message
MAX_WIRE_BYTES = 1 << 31  # bytes per frame a report may state (2 GiB: beyond any tensor the runtime sends)
MAX_ENCODE_SECONDS = 60.0  # encode time a report may state
MAX_AGE_SECONDS = 7 * 86400.0  # age a report may state
MAX_NAME_CHARS = 256  # split id and codec name
MIN_SAMPLES = 3  # frames behind a figure before it prices anything
TTL_SECONDS = 300.0  # a figure with no sample for this long is forgotten
TOLERANCE = 0.10  # remake the re-priced profile when a figure moved by more than this (relative)
MAX_FIGURES = 64  # (split, codec, TL) figures kept per agent
UNNUMBERED_QUALITY = {"jpeg": 90}  # a codec named without its quality: the wire's default (runtime.wire.jpeg)


def check(t: pb.Telemetry) -> None:
    """InvalidInput for a Telemetry.wire that is too long or holds a figure that is no measurement."""
    if len(t.wire) > MAX_REPORTS:
        raise InvalidInput(f"wire holds at most {MAX_REPORTS} reports")
    for w in t.wire:
        if len(w.split_id) > MAX_NAME_CHARS or len(w.codec) > MAX_NAME_CHARS:
            raise InvalidInput(f"a wire report's split_id and codec are at most {MAX_NAME_CHARS} characters")
        if not (math.isfinite(w.mean_bytes) and 0 <= w.mean_bytes <= MAX_WIRE_BYTES):
            raise InvalidInput(f"a wire report's mean_bytes must be a finite number in [0, {MAX_WIRE_BYTES}]")
        if not (math.isfinite(w.encode_seconds) and 0 <= w.encode_seconds <= MAX_ENCODE_SECONDS):
            raise InvalidInput(f"a wire report's encode_seconds must be finite seconds in [0, {MAX_ENCODE_SECONDS:g}]")
        if not (math.isfinite(w.age_seconds) and 0 <= w.age_seconds <= MAX_AGE_SECONDS):
            raise InvalidInput(f"a wire report's age_seconds must be finite seconds in [0, {MAX_AGE_SECONDS:g}]")


@dataclass
class Figure:
    mean_bytes: float
    encode_seconds: float  # 0: not measured
    samples: int
    updated: float  # wall-clock time of its last sample


Key = tuple[str, str, str]  # (split id, codec, TL id)


def plan_tl(plan: pb.Plan | None, split_id: str, codec: str) -> str:
    """The TL id under which the agent's ``plan`` (or one of its fallbacks) sends ``split_id`` with ``codec``."""
    if plan is None:
        return ""
    for p in (plan, *(b.plan for b in plan.fallbacks)):
        if p.split_id == split_id and p.codec == codec:
            return str(p.tl_id)
    return ""


class WireFigures:
    """One agent's measured bytes and encode times per (split, codec, TL), and those its profile is priced with."""

    def __init__(self) -> None:
        self.figures: dict[Key, Figure] = {}
        self.applied: dict[Key, tuple[float, float]] = {}  # what the device profile decisions use was made with

    def take(self, t: pb.Telemetry, plan: pb.Plan | None, now: float) -> None:
        """A checked report's figures (entries with fewer than MIN_SAMPLES frames are not taken yet)."""
        for w in t.wire:
            if w.samples < MIN_SAMPLES or w.mean_bytes <= 0 or not (w.split_id and w.codec):
                continue
            key = (w.split_id, w.codec, plan_tl(plan, w.split_id, w.codec))
            if key not in self.figures and len(self.figures) >= MAX_FIGURES:
                continue
            self.figures[key] = Figure(w.mean_bytes, w.encode_seconds, w.samples, now - w.age_seconds)

    def expire(self, now: float) -> None:
        for key in [k for k, f in self.figures.items() if now - f.updated > TTL_SECONDS]:
            del self.figures[key]

    def moved(self) -> bool:
        """Whether the figures differ from those the profile was made with (beyond TOLERANCE, or a new or gone one)."""
        if self.figures.keys() != self.applied.keys():
            return True
        return any(_far(f.mean_bytes, self.applied[k][0]) or _far(f.encode_seconds, self.applied[k][1])
                   for k, f in self.figures.items())

    def apply(self) -> None:
        self.applied = {k: (f.mean_bytes, f.encode_seconds) for k, f in self.figures.items()}


def _far(a: float, b: float) -> bool:
    return abs(a - b) > TOLERANCE * max(abs(b), 1e-12)


def patched(profile: Profile, applied: dict[Key, tuple[float, float]]) -> Profile:
    """``profile`` with the transfers named in ``applied`` ((split, codec, TL) -> (bytes, encode seconds))
    re-priced; ``profile`` itself when none of them is in it."""
    if not applied:
        return profile
    cut_of = {"input": 0, **{b.name: b.index + 1 for b in profile.blocks}}
    by_cut: dict[int, dict[tuple[str, str], tuple[float, float]]] = {}
    for (split, codec, tl), figs in applied.items():
        if split in cut_of:
            by_cut.setdefault(cut_of[split], {})[(codec, tl)] = figs

    def fix(transfers: tuple[Transfer, ...], figs: dict[tuple[str, str], tuple[float, float]]) -> tuple[Transfer, ...]:
        ratios = _family_ratios(transfers, figs)
        out = []
        for t in transfers:
            f = figs.get((t.codec, t.tl_id))
            if f is not None:
                enc = f[1] if f[1] > 0 and not t.tl_id else t.encode_seconds
                t = dataclasses.replace(t, bytes=max(1, round(f[0])), encode_seconds=enc)
            elif (family := ratios.get((_family(t.codec), t.tl_id))) is not None:
                t = dataclasses.replace(t, bytes=max(1, round(t.bytes * _nearest(family, _quality(t.codec)))))
            out.append(t)
        return tuple(out)

    if not by_cut:
        return profile
    # a cut that lists no transfers sends its tensor raw (Profile.transfers_after): priced as one here
    inputs = fix(profile.transfers_after(0), by_cut[0]) if 0 in by_cut else profile.input_transfers
    blocks = tuple(dataclasses.replace(b, transfers=fix(profile.transfers_after(b.index + 1), by_cut[b.index + 1]))
                   if b.index + 1 in by_cut else b for b in profile.blocks)
    return dataclasses.replace(profile, input_transfers=inputs, blocks=blocks)


def _family(codec: str) -> str:
    """A codec's family: its name less a trailing quality (``jpeg40`` -> ``jpeg``; ``int8+lz4`` is its own)."""
    return codec.rstrip("0123456789")


def _quality(codec: str) -> int:
    digits = codec[len(_family(codec)):]
    return int(digits) if digits else UNNUMBERED_QUALITY.get(codec, 0)


def _family_ratios(transfers: tuple[Transfer, ...], figs: dict[tuple[str, str], tuple[float, float]]
                   ) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Per (codec family, TL) at one cut: (quality, measured / profiled bytes) of each measured transfer."""
    ratios: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for t in transfers:
        f = figs.get((t.codec, t.tl_id))
        if f is not None and t.bytes > 0:
            ratios.setdefault((_family(t.codec), t.tl_id), []).append((_quality(t.codec), f[0] / t.bytes))
    return ratios


def _nearest(family: list[tuple[int, float]], quality: int) -> float:
    """The ratio of the measured quality nearest ``quality`` (the larger ratio of two as near)."""
    return max(family, key=lambda qr: (-abs(qr[0] - quality), qr[1]))[1]
