"""Fidelity on many frames, outside the latency run: the top-1 agreement of a plan (its split, codec and
Transfer Layer) with the unsplit model, on the unrestricted side (the board's quota changes no number).

The latency run sends the same few bundled photos again and again, so its fidelity column rests on four
distinct images. Here every candidate the edgesplit planner would choose is checked on ``n`` frames (seeded
random resized crops of natural photos, made by the caller) before it runs; one below the fidelity floor is
struck from the profile and the planner asked again (:func:`verified`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from runtime.contracts.costmodel import Configuration, Link
from runtime.contracts.profile import Profile
from runtime.measure.scenarios import costs

BATCH = 16  # frames per model pass (the codecs still see one frame at a time, as on the wire)
THREADS = 2  # torch threads of the checks (reference and plan on the same count: their results agree bit for bit)


class Checker:
    """Agreement of plans with the unsplit model on ``xs`` ([N, 3, H, W]); results cached per plan."""

    def __init__(self, loaded, xs: torch.Tensor, describe: str):
        self.loaded, self.xs, self.describe = loaded, xs, describe
        self.frames = int(xs.shape[0])
        self.seconds = 0.0  # spent measuring, reference included
        self.ref = self._top1(lambda x: loaded.full(x))
        self.cache: dict[tuple[str, str, str], float] = {}

    def _top1(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Top-1 of ``fn`` on every frame, on THREADS torch threads (the board child is idle meanwhile)."""
        before, t = torch.get_num_threads(), time.perf_counter()
        torch.set_num_threads(THREADS)
        try:
            with torch.inference_mode():
                return torch.cat([fn(self.xs[i:i + BATCH]).argmax(dim=1) for i in range(0, self.frames, BATCH)])
        finally:
            torch.set_num_threads(before)
            self.seconds += time.perf_counter() - t

    def agreement(self, split: str, codec_name: str, tl_path: str = "") -> float:
        """Top-1 agreement of frames sent at ``split`` through ``codec_name`` (and the TL at ``tl_path``)."""
        key = (split, codec_name, tl_path)
        if key not in self.cache:
            self.cache[key] = self._measure(split, codec_name, tl_path)
        return self.cache[key]

    def _measure(self, split: str, codec_name: str, tl_path: str) -> float:
        from runtime.transfer.artifact import load_tl
        from runtime.wire.codec import get_codec

        tl = load_tl(tl_path, loaded=self.loaded) if tl_path else None
        codec = get_codec(codec_name, model=tl.tl.entropy_model if tl is not None else None, spec=self.loaded.spec)
        head, tail = self.loaded.head(split), self.loaded.tail(split)

        def through(x: torch.Tensor) -> torch.Tensor:
            h = head(x)
            out = []
            for i in range(h.shape[0]):
                z = h[i:i + 1]
                if tl is not None:
                    z = tl.tl.encoder(z)
                z = codec.decode(codec.encode(z))
                out.append(tl.tl.decoder(z) if tl is not None else z)
            return tail(torch.cat(out))

        return float((self._top1(through) == self.ref).float().mean())


def exact(codec_name: str, tl_id: str) -> bool:
    """raw fp32 without a TL: the split model computes what the unsplit one does."""
    return codec_name == "raw" and not tl_id


def _plain_jpeg(t) -> bool:
    from runtime.wire.jpeg import is_jpeg

    return is_jpeg(t.codec) and not t.tl_id


def _bound_jpegs(dev: Profile, cut: int, failed_q: int, agree: float, floor: float, measure) -> Profile:
    """After a JPEG of quality ``failed_q`` fell below ``floor``: measure the highest quality at that cut too;
    strike every quality up to the highest that failed (more quantisation, more loss: assumed for the qualities
    measured by neither, which take the failed one's figure)."""
    from runtime.wire.jpeg import jpeg_quality

    jpegs = sorted((o for o in dev.transfers_after(cut) if _plain_jpeg(o)), key=lambda o: jpeg_quality(o.codec) or 0)
    top = jpegs[-1]
    top_q = jpeg_quality(top.codec) or 0
    if top_q > failed_q:
        top_agree = measure(top, chosen=False)
        dev = costs.with_fidelity(dev, cut, top.name, top_agree)
        if top_agree < floor:
            failed_q, agree = top_q, top_agree
    for o in jpegs:
        if (jpeg_quality(o.codec) or 0) < failed_q:
            dev = costs.with_fidelity(dev, cut, o.name, agree)
    return dev


def verified(rank, dev: Profile, edge: Profile, link: Link, floor: float, check: Checker, tl_path: str,
             rounds: int = 8) -> tuple[Configuration | None, Profile, list[dict]]:
    """The planner's best configuration whose transfer keeps ``floor`` on ``check``'s frames: rank, measure the
    chosen transfer's agreement, strike it from ``dev`` when below (its measured fidelity set; a JPEG bounds the
    other qualities, :func:`_bound_jpegs`), rank again. After ``rounds`` plans below the floor only exact
    transfers (raw fp32, no TL) remain. Returns (configuration, the profile it was ranked on, every check made)."""
    from runtime.wire.jpeg import jpeg_quality

    checks: list[dict] = []
    for _ in range(rounds):
        conf = rank(dev, edge, link, floor)
        if conf is None or not conf.hops:
            return conf, dev, checks
        h = conf.hops[0]
        t = h.transfer
        if exact(t.codec, t.tl_id):
            return conf, dev, checks

        def measure(tr, chosen: bool = True, split: str = h.split) -> float:
            agree = check.agreement(split, tr.codec, tl_path if tr.tl_id else "")
            seen = next((c for c in checks if (c["split"], c["transfer"]) == (split, tr.name)), None)
            if seen is None:
                checks.append({"split": split, "transfer": tr.name, "fidelity": agree, "frames": check.frames,
                               "kept": agree >= floor if chosen else None})
            elif chosen:
                seen["kept"] = agree >= floor
            return agree

        agree = measure(t)
        dev = costs.with_fidelity(dev, h.cut, t.name, agree)
        if agree >= floor:
            return conf, dev, checks
        if _plain_jpeg(t):
            dev = _bound_jpegs(dev, h.cut, jpeg_quality(t.codec) or 0, agree, floor, measure)
    dev = costs.restrict(dev, lambda cut, n, ts: tuple(t for t in ts if exact(t.codec, t.tl_id)))
    return rank(dev, edge, link, floor), dev, checks
