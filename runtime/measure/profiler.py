"""Measure one model on this machine, block by block, into a benchmark profile (``edgesplit profile``).

Block ``i`` is ``segment(i, i + 1)`` of the sliced model (split point ``i`` to split point ``i + 1``).
Each block runs on its real input: the bundled sample photos, preprocessed for the model and passed
through the blocks before it (batch 1). Per block:

* ``seconds`` / ``p95_seconds``: median / 95th percentile (nearest rank) of ``runs`` timed calls
  after ``warmup`` untimed ones, cycling over the inputs; blocks are timed inside whole passes.
* ``first_layer`` / ``last_layer``: positions in the traced ``torch.fx`` graph (the order of
  :attr:`SlicedModel.nodes`) of the first node after the cut at split point ``i`` and of the node
  whose tensor crosses at split point ``i + 1``.
* ``param_bytes``: bytes of the distinct parameters and buffers the block's graph uses.
* ``transfers``: per wire codec (and per Transfer Layer artifact at that split, before each codec)
  the bytes actually on the wire (:func:`wire_bytes`, median over the inputs, always one of the
  measured sizes) and the median encode and decode times of ``runs`` calls. A TL transfer's
  ``fidelity`` is the hold-out top-1 agreement its manifest records (measured without a codec);
  codec-only transfers leave it ``None``, except ``jpeg``/``jpegQ`` (measured at the input cut only,
  where the tensor is the model's input image): its fidelity is the top-1 agreement of the unsplit
  model on the JPEG-decoded inputs with the model on the originals, over the profiled inputs.

The profile says nothing about links: the planner combines it with measured bandwidth.
"""

from __future__ import annotations

import logging
import math
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from runtime.contracts.errors import InvalidInput
from runtime.contracts.profile import ROLES, Block, Profile, Transfer
from runtime.measure.defaults import DEFAULT_CODECS  # re-exported
from runtime.models.loader import LoadedModel, load_model
from runtime.wire.codec import get_codec, wire_bytes  # wire_bytes: the one definition, shared with the agent
from runtime.wire.jpeg import is_jpeg, jpeg_quality
from runtime.wire.pixels import is_input_codec

if TYPE_CHECKING:
    from runtime.models.spec import ModelSpec
    from runtime.proto.edgesplit.v1 import tensor_pb2
    from runtime.transfer.artifact import LoadedTL
    from runtime.wire.codec_base import Codec

logger = logging.getLogger(__name__)
T = TypeVar("T")  # what a timed function takes


def _times(fn: Callable[[T], object], xs: Sequence[T], runs: int, warmup: int) -> list[float]:
    """Seconds of ``runs`` calls of ``fn`` cycling over ``xs``, after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(xs[i % len(xs)])
    out = []
    for i in range(runs):
        x = xs[i % len(xs)]
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def _chain_times(segs: Sequence[Callable[[torch.Tensor], torch.Tensor]], xs: Sequence[torch.Tensor], runs: int,
                 warmup: int) -> list[list[float]]:
    """Per block, the seconds of ``runs`` passes through all blocks in order (after ``warmup``).

    Timing each block inside a whole pass, rather than one block many times over, keeps caches
    as cold or warm as a real frame finds them: repeating one small block on a hot cache made
    EfficientNet-Lite0's block sum 19 ms against 23.6 ms for the whole model.
    """
    out: list[list[float]] = [[] for _ in segs]
    for r in range(warmup + runs):
        x = xs[r % len(xs)]
        for i, seg in enumerate(segs):
            t0 = time.perf_counter()
            x = seg(x)
            if r >= warmup:
                out[i].append(time.perf_counter() - t0)
    return out


def _p95(times: Sequence[float]) -> float:
    s = sorted(times)
    return s[max(0, math.ceil(0.95 * len(s)) - 1)]


def param_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the distinct parameters and buffers referenced by the nodes of ``gm``'s graph."""
    seen: dict[int, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            tensors = [*mod.parameters(), *mod.buffers()]
        elif n.op == "get_attr":
            obj = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            tensors = [obj] if isinstance(obj, torch.Tensor) else []
        else:
            continue
        for t in tensors:
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _transfers(ys: Sequence[torch.Tensor], codecs: Sequence[str], runs: int, warmup: int,
               tl: LoadedTL | None = None, fidelity: float | None = None, spec: ModelSpec | None = None) -> list[Transfer]:
    """One :class:`Transfer` per codec for the tensors ``ys`` (through ``tl``'s encoder/decoder if given).
    Input-image codecs (jpeg, pixels) are measured only with ``spec`` (at the input cut, where ``ys`` are the
    model's inputs)."""
    out = []
    zs = [tl.tl.encoder(y) for y in ys] if tl is not None else list(ys)
    model = tl.tl.entropy_model if tl is not None else None
    if model is not None:  # a transform TL is also measured with its own entropy coder
        codecs = [*codecs, *(["ans"] if "ans" not in codecs else [])]
    codecs = [c for c in codecs if not is_input_codec(c) or (spec is not None and tl is None)]
    for name in codecs:
        codec = get_codec(name, model=model, spec=spec)
        try:
            msgs = [codec.encode(z) for z in zs]
        except InvalidInput as e:  # e.g. a lossy codec on an integer tensor
            logger.warning("codec %s skipped: %s", name, e)
            continue
        enc, dec = (codec.encode, codec.decode) if tl is None else _through(tl, codec)
        out.append(Transfer(
            name=f"{tl.tl_id}+{name}" if tl is not None else name,
            bytes=statistics.median_low(wire_bytes(m) for m in msgs),
            encode_seconds=statistics.median(_times(enc, ys, runs, warmup)),
            decode_seconds=statistics.median(_times(dec, msgs, runs, warmup)),
            codec=name, tl_id=tl.tl_id if tl is not None else "", fidelity=fidelity))
    return out


def _through(tl: LoadedTL, codec: Codec) -> tuple[Callable[[torch.Tensor], object],
                                                  Callable[[tensor_pb2.Tensor], object]]:
    """Encode through ``tl``'s encoder then ``codec``; decode through ``codec`` then ``tl``'s decoder."""
    return (lambda y: codec.encode(tl.tl.encoder(y))), (lambda m: tl.tl.decoder(codec.decode(m)))


def input_fidelity(loaded: LoadedModel, xs: Sequence[torch.Tensor], codec_name: str) -> float:
    """Top-1 agreement of the unsplit model on ``xs`` sent through ``codec_name`` with it on ``xs``."""
    codec = get_codec(codec_name, spec=loaded.spec)
    full = loaded.full
    agree = [int(full(x).argmax()) == int(full(codec.decode(codec.encode(x))).argmax()) for x in xs]
    return sum(agree) / len(agree)


def _input_transfers(loaded: LoadedModel, xs: Sequence[torch.Tensor], codecs: Sequence[str], arts: Sequence[LoadedTL],
                     runs: int, warmup: int, fidelity: bool = True) -> list[Transfer]:
    """The transfers of the input cut: codecs (JPEG among them, with its measured fidelity unless not
    ``fidelity``: then None, left to the caller) and TLs."""
    out = _transfers(xs, codecs, runs, warmup, spec=loaded.spec)
    if fidelity:
        out = [replace(t, fidelity=input_fidelity(loaded, xs, t.codec)) if is_jpeg(t.codec) else t for t in out]
    return [*out, *_tl_transfers(arts, 0, xs, codecs, runs, warmup)]


def _load_tls(loaded: LoadedModel, paths: Sequence[str]) -> list[LoadedTL]:
    """The TL artifacts of ``paths`` made for ``loaded`` (others are skipped with a warning)."""
    from runtime.transfer.artifact import load_tl, read_manifest, resolve_path

    arts = []
    for p in paths:
        manifest = read_manifest(resolve_path(p))
        if manifest["model"] != loaded.name:
            logger.warning("Transfer Layer %s is for model %s, not %s: skipped", p, manifest["model"], loaded.name)
            continue
        arts.append(load_tl(p, loaded=loaded))
    return arts


def _fidelity(manifest: dict[str, Any]) -> float | None:
    v = (manifest.get("fidelity") or {}).get("top1_agreement")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1 else None


def _tl_transfers(arts: Sequence[LoadedTL], k: int, ys: Sequence[torch.Tensor], codecs: Sequence[str], runs: int,
                  warmup: int) -> list[Transfer]:
    """Transfers through each TL artifact made for split point ``k``."""
    return [t for a in arts if a.split.index == k
            for t in _transfers(ys, codecs, runs, warmup, a, _fidelity(a.manifest))]


def _inputs(loaded: LoadedModel, n: int) -> list[torch.Tensor]:
    from runtime.agent.sources import open_source

    return [f.tensor for f in open_source(loaded.spec, "samples", n)]


def profile_model(model: str | LoadedModel, role: str, machine: str | None = None, runs: int = 20, warmup: int = 3,
                  codecs: Sequence[str] = DEFAULT_CODECS, tls: Sequence[str] = (), threads: int = 1,
                  progress: bool = True, inputs: int = 4, jpeg_fidelity: bool = True) -> Profile:
    """Time every block of ``model`` and every way to send its output on this machine.

    ``machine`` defaults to the host name; ``tls`` are Transfer Layer manifest paths (artifacts of
    another model are skipped). The model's tensors cross at batch 1; torch runs on ``threads``.
    ``jpeg_fidelity``: measure a JPEG's top-1 agreement on the ``inputs`` photos (False: left unmeasured, for a
    caller that measures it on more frames elsewhere, e.g. bench-scenarios on the unrestricted side).
    """
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    for what, v, least in (("runs", runs, 1), ("warmup", warmup, 0), ("threads", threads, 1), ("inputs", inputs, 1)):
        if v < least:
            raise InvalidInput(f"{what} must be >= {least}, got {v}")
    codecs = tuple(dict.fromkeys(codecs))
    for c in codecs:
        if not is_input_codec(c):
            get_codec(c)  # unknown names fail before anything is timed
        elif is_jpeg(c):
            jpeg_quality(c)  # InvalidInput for a quality outside 1..100
    from tqdm import tqdm

    host = socket.gethostname()
    loaded = load_model(model) if isinstance(model, str) else model
    arts = _load_tls(loaded, tls)
    points = loaded.sliced.split_points
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(), tqdm(total=len(points) - 1, desc=f"profile {loaded.name}", unit="block",
                                          disable=None if progress else True) as bar:  # None: only on a terminal
            xs = _inputs(loaded, inputs)
            input_transfers = _input_transfers(loaded, xs, codecs, arts, runs, warmup, jpeg_fidelity)
            segs, outs = [], []
            for i, sp in enumerate(points[1:]):
                bar.set_postfix_str(f"{i}:{sp.name}")
                seg = loaded.segment(i, i + 1)
                xs = [seg(x) for x in xs]  # the next block's inputs
                segs.append(seg)
                outs.append((*_transfers(xs, codecs, runs, warmup), *_tl_transfers(arts, i + 1, xs, codecs, runs, warmup)))
                bar.update()
            times = _chain_times(segs, _inputs(loaded, inputs), runs, warmup)
            blocks = []
            for i, sp in enumerate(points[1:]):
                first, last = loaded.sliced.span(i, i + 1)
                blocks.append(Block(
                    index=i, name=sp.name, seconds=statistics.median(times[i]), output_bytes=sp.fp32_bytes,
                    p95_seconds=_p95(times[i]), first_layer=first, last_layer=last, param_bytes=param_bytes(segs[i]),
                    transfers=outs[i]))
    finally:
        torch.set_num_threads(before)
    return Profile(
        machine=machine or host, role=role, model=loaded.name, blocks=tuple(blocks),
        input_bytes=points[0].fp32_bytes, input_transfers=tuple(input_transfers), model_digest=loaded.digest,
        source=f"edgesplit profile on {host}", created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        settings={"warmup": warmup, "runs": runs, "threads": threads, "torch": torch.__version__, "inputs": inputs,
                  "input_source": "samples", "batch": 1, "codecs": list(codecs), "tls": [a.tl_id for a in arts]})
