"""Each peer's candidate transfers as profiles its cost model ranks (pure), the physical floor of a
frame, and the per-strategy summary of measured rows."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

from runtime.contracts.profile import Profile, Transfer
from runtime.wire.jpeg import is_jpeg

REFERENCE_TL = "reference-2x2"  # ScissionLite's parameter-free TL, named in its transfers


def _with_transfers(p: Profile, pick) -> Profile:
    blocks = tuple(replace(b, transfers=pick(b.index + 1, b.output_bytes, b.transfers)) for b in p.blocks)
    return replace(p, blocks=blocks, input_transfers=pick(0, p.input_bytes, p.input_transfers))


def _raw(bytes_: int, transfers: tuple[Transfer, ...]) -> tuple[Transfer, ...]:
    raw = [t for t in transfers if t.codec == "raw" and not t.tl_id]
    return tuple(raw[:1]) or (Transfer("raw", bytes_, codec="raw"),)


def scission(p: Profile) -> Profile:
    """Scission: raw fp32 features at every cut, no TL."""
    return _with_transfers(p, lambda cut, n, ts: _raw(n, ts))


def pooled_bytes(shape: tuple[int, ...]) -> int | None:
    """fp32 bytes after the 2x2 max-pool of a [1, C, H, W] tensor (odd sizes round up); None otherwise."""
    if len(shape) != 4:
        return None
    return shape[1] * math.ceil(shape[2] / 2) * math.ceil(shape[3] / 2) * 4


def scissionlite(p: Profile, shapes: list[tuple[int, ...]]) -> Profile:
    """ScissionLite: at every 4-D cut after the first block, the reference TL's pooled fp32 bytes
    (its pool/up-sample time is not in the profile: about a copy of the tensor); raw fp32 elsewhere."""
    def pick(cut: int, n: int, ts: tuple[Transfer, ...]) -> tuple[Transfer, ...]:
        b = pooled_bytes(shapes[cut]) if cut > 0 else None
        if b is None:
            return _raw(n, ts)
        return (Transfer(f"{REFERENCE_TL}+raw", b, codec="raw", tl_id=REFERENCE_TL, fidelity=1.0),)
    return _with_transfers(p, pick)


def edgesplit(p: Profile, codecs: tuple[str, ...]) -> Profile:
    """edgesplit: the given codecs, and every profiled TL transfer (ranked under the fidelity floor)."""
    def pick(cut: int, n: int, ts: tuple[Transfer, ...]) -> tuple[Transfer, ...]:
        keep = tuple(t for t in ts if t.tl_id or t.codec in codecs)
        return keep or _raw(n, ts)
    return _with_transfers(p, pick)


def rescale(p: Profile, factor: float) -> Profile:
    """Every time in ``p`` x ``factor``. Under a CFS quota the throttling (~45 ms stalls in a 50 ms period) lands
    in whichever blocks cross a period's end, so per-block medians misplace it: the block sum came to 0.55-1.18 of
    the local run's p50 in the runs of 2026-12-03 (0.34-0.65 with the 20 ms period of the first runs). One factor
    fixes the whole model's time, not how it splits between head and tail: the harness prices the heads with
    :func:`with_board_heads` and uses this factor only for the board's codec encode times it did not time."""
    def t(tr: Transfer) -> Transfer:
        return replace(tr, encode_seconds=tr.encode_seconds * factor, decode_seconds=tr.decode_seconds * factor)
    blocks = tuple(replace(b, seconds=b.seconds * factor, transfers=tuple(map(t, b.transfers)),
                           p95_seconds=None if b.p95_seconds is None else b.p95_seconds * factor) for b in p.blocks)
    return replace(p, blocks=blocks, input_transfers=tuple(map(t, p.input_transfers)),
                   settings={**p.settings, "rescaled_by": factor})


def head_curve(prior_ms: list[float], anchors_ms: dict[int, float], total_ms: float) -> tuple[list[float], float]:
    """Head time per cut (0 = no block .. n = the whole model), non-decreasing: the prior (e.g. prefix medians of
    whole passes) scaled so the whole model takes ``total_ms``, through the measured ``anchors_ms`` (cut -> head
    time timed on its own), each unmeasured cut held between the anchors either side. Returns (curve, the scale)."""
    n = len(prior_ms) - 1
    scale = total_ms / prior_ms[n] if prior_ms[n] > 0 else 1.0
    inner = sorted((k, v) for k, v in anchors_ms.items() if 0 < k < n)
    # measured anchors out of order (noise: a head's time under the quota moves in whole periods, and a shorter head
    # once took a period more than a longer one, 252 against 199 ms) are pooled to their mean, not lifted to the
    # highest: each is a measurement of the same rising curve
    levels = _isotonic([v for _, v in inner])
    fixed = {0: 0.0, **{k: min(max(v, 0.0), total_ms) for (k, _), v in zip(inner, levels, strict=True)}, n: total_ms}
    cuts = sorted(fixed)
    curve, level = [], 0.0
    for k in range(n + 1):
        lo = fixed[max(c for c in cuts if c <= k)]
        hi = fixed[min(c for c in cuts if c >= k)]
        level = max(level, min(max(prior_ms[k] * scale, lo), hi))
        curve.append(fixed.get(k, level))
    return curve, scale


def _isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence nearest ``values`` in squared error (pool adjacent violators: a run that falls
    becomes its mean)."""
    pools: list[list[float]] = []  # [sum, count]
    for v in values:
        pools.append([v, 1.0])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] > pools[-1][0] / pools[-1][1]:
            s, c = pools.pop()
            pools[-1][0] += s
            pools[-1][1] += c
    return [s / c for s, c in pools for _ in range(int(c))]


def with_board_heads(p: Profile, curve_ms: list[float]) -> Profile:
    """``p`` whose blocks add up to ``curve_ms`` at every cut (block i = curve[i + 1] - curve[i]): the planner's head
    after k blocks costs curve[k], as the board measured it, the same for every strategy. p95 is left unset."""
    if len(curve_ms) != len(p.blocks) + 1:
        raise ValueError(f"{len(curve_ms)} head times for {len(p.blocks)} blocks (need one per cut, 0..n)")
    blocks = tuple(replace(b, seconds=max(0.0, curve_ms[b.index + 1] - curve_ms[b.index]) / 1e3, p95_seconds=None)
                   for b in p.blocks)
    return replace(p, blocks=blocks)


def with_encode(p: Profile, cut: int, name: str, seconds: float) -> Profile:
    """``p`` with the board's encode time (TL encoder + codec) of transfer ``name`` after ``cut`` blocks set to
    ``seconds``, timed on the board one frame at a time."""
    def pick(c: int, n: int, ts: tuple[Transfer, ...]) -> tuple[Transfer, ...]:
        return tuple(replace(t, encode_seconds=seconds) if c == cut and t.name == name else t for t in ts)
    return _with_transfers(p, pick)


def with_input_encode(p: Profile, seconds: float) -> Profile:
    """``p`` with the encode time of the input cut's JPEG transfers (any quality) set to ``seconds``: the
    board's q90 encode measured on the same frames, rather than the profile's median scaled by
    :func:`rescale` (a factor for the blocks' throttling that tripled it: 59 against ~17 ms for
    EfficientNet-Lite0). Other qualities take the q90 time (the encode is mostly colour conversion
    and DCT, whatever the quantisation)."""
    return replace(p, input_transfers=tuple(replace(t, encode_seconds=seconds) if is_jpeg(t.codec) and not t.tl_id
                                            else t for t in p.input_transfers))


def with_codec_encode(p: Profile, codec: str, seconds: float, bytes_: int | None = None) -> Profile:
    """``p`` with the encode time of the input cut's ``codec`` transfer (no TL) set to ``seconds``: measured on the
    board frame by frame (e.g. pixels+lz4, webp), not the profile's median scaled by :func:`rescale`; with
    ``bytes_``, its bytes too (the median over the frames the strategies send: the profile keeps the lower middle of
    its 4 photos, 36 against 49 KB for webp, which priced EfficientNet-Lite0's 1.6 Mbit/s webp plan 70 ms low)."""
    return replace(p, input_transfers=tuple(
        replace(t, encode_seconds=seconds, bytes=t.bytes if bytes_ is None else bytes_)
        if t.codec == codec and not t.tl_id else t for t in p.input_transfers))


def restrict(p: Profile, keep) -> Profile:
    """``p`` with only the transfers ``keep(cut, bytes, transfers)`` returns (raw fp32 where none is left)."""
    return _with_transfers(p, lambda cut, n, ts: keep(cut, n, ts) or _raw(n, ts))


def with_fidelity(p: Profile, cut: int, name: str, fidelity: float) -> Profile:
    """``p`` with the transfer ``name`` after ``cut`` blocks carrying ``fidelity`` (measured elsewhere)."""
    def pick(c: int, n: int, ts: tuple[Transfer, ...]) -> tuple[Transfer, ...]:
        return tuple(replace(t, fidelity=fidelity) if c == cut and t.name == name else t for t in ts)
    return _with_transfers(p, pick)


BOARD_STAGES = ("head", "tl_encode", "encode")  # the board's compute for one frame (blocks, TL encoder, codec)
EDGE_STAGES = ("edge_decode", "edge_tail")  # the edge's (codec and TL decoder, blocks)


def floor_ms(times_ms: dict, up_bytes: float, down_bytes: int, mbps: float, rtt_ms: float) -> float:
    """The physical floor of one frame: compute (board: head, TL encoder, codec encode; edge: decode, tail) +
    bytes both ways / bandwidth + RTT. What the runtime adds (threads, gRPC, queues) is the rest."""
    compute = sum(times_ms.get(k, 0.0) for k in (*BOARD_STAGES, *EDGE_STAGES))
    return compute + (up_bytes + down_bytes) * 8 / (mbps * 1e3) + rtt_ms


def bound_fps(rows: list[dict], up_bytes: float, down_bytes: int, mbps: float) -> float:
    """1 / the slowest stage (board compute, uplink, downlink, edge compute; medians per frame) in frames/s:
    what frames in flight can reach at best, the board and the edge each doing one frame at a time."""
    med = lambda keys: statistics.median(sum(r["times_ms"].get(k, 0.0) for k in keys) for r in rows)  # noqa: E731
    stages = [med(BOARD_STAGES), med(EDGE_STAGES), up_bytes * 8 / (mbps * 1e3), down_bytes * 8 / (mbps * 1e3)]
    return 1e3 / max(stages)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summarise(totals: list[float], floors: list[float], bytes_: list[float], top1: list[int], ref: list[int],
              predicted_ms: float | None) -> dict:
    """p50/p95 latency, bytes/frame, fidelity against the unsplit model's top-1, floor and overhead."""
    over = [t - f for t, f in zip(totals, floors, strict=True)]
    p50 = statistics.median(totals)
    return {"frames": len(totals), "p50_ms": p50, "p95_ms": _pct(totals, 0.95),
            "bytes_per_frame": statistics.median(bytes_),
            "fidelity": sum(a == b for a, b in zip(top1, ref, strict=True)) / len(ref),
            "floor_p50_ms": statistics.median(floors), "overhead_p50_ms": statistics.median(over),
            "overhead_pct": 100 * statistics.median(over) / statistics.median(floors),
            "predicted_ms": predicted_ms,
            "predicted_error_pct": None if predicted_ms is None else 100 * (p50 - predicted_ms) / predicted_ms}
