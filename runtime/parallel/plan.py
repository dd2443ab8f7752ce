"""A parallel plan stage (RFS/DPFP) as data: the blocks, the workers, the row shares.

One definition shared by the planner (which proposes stages: ``planner.dpfp``, ``edgesplit plan
--parallel``), the agent (which runs them: ``runtime.agent.parallel``) and the wire
(``tiles.proto`` ``ParallelStage``, carried by ``planner.proto`` ``Plan.parallel``). The plan JSON
document::

    {"format": "edgesplit-parallel-plan", "version": 1, "model": "vgg16",
     "workers": ["w0", "w1"],                       # names or HOST:PORT; --parallel-workers maps them
     "codec": "raw",
     "blocks": [{"start": "input", "end": "maxpool2d", "shares": [1, 1], "predicted_seconds": 0.05,
                 "grid_cols": 1,                   # 1: row bands; c > 1: a grid of c tiles per row
                 "halo_input": false}],            # true: input by halo exchange between workers (not block 0)
     "predicted_seconds": 0.2, "strategy": "dpfp",
     "tail_worker": "", "tail_worker_id": ""}      # "": the agent runs the rest after the last block; else
                                                    # HOST:PORT (and id) of the worker that does (an edge frame)

Every value read from a file or the wire is bounded (``MAX_*`` below) before use. Pure Python.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.contracts.errors import InvalidInput
from runtime.contracts.files import read_capped

FORMAT = "edgesplit-parallel-plan"
VERSION = 1
MAX_WORKERS = 64
"""Most workers one stage may name."""
MAX_BLOCKS = 256
"""Most fused blocks one stage may hold."""
MAX_NAME = 256
"""Longest worker name, address or split-point name (characters)."""
MAX_FILE_BYTES = 1 << 20
"""Largest plan JSON file read (bytes)."""


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"halo_input must be true or false, got {v!r}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"tail_worker and tail_worker_id must be strings, got {v!r}")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"grid_cols must be an integer, got {v!r}")
    return v


@dataclass(frozen=True)
class TiledBlock:
    """One fused block of a parallel stage."""

    start: str  # split point where the block begins (name or index)
    end: str  # split point where it ends
    shares: tuple[float, ...]  # output-row weight per stage worker, in the stage's worker order (0: none)
    predicted_seconds: float = 0.0  # the planner's prediction (0: unknown)
    grid_cols: int = 1  # tiles per row of a 2-D grid (1: full-width row bands; receptive.partition)
    halo: bool = False  # input by halo exchange between workers: the previous block's tiles stay on them


@dataclass(frozen=True)
class ParallelStage:
    """Consecutive fused blocks, each spread over some of ``workers``."""

    workers: tuple[str, ...]  # HOST:PORT (or, in a plan file, names --parallel-workers maps to addresses)
    blocks: tuple[TiledBlock, ...]  # in order; each begins where the previous one ends
    codec: str = "raw"  # codec of crops and tiles on the wire
    model: str = ""  # the model the blocks belong to ("" = not stated)
    predicted_seconds: float = 0.0  # the planner's prediction for the whole stage (0: unknown)
    strategy: str = ""  # what proposed it: dpfp, layer_by_layer, fused_all, single_worker, or by hand
    tail_worker: str = ""  # HOST:PORT of the worker that runs the rest after the last block ("": the agent does)
    tail_worker_id: str = ""  # its id (the planner's name for it; "" when not known)

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", tuple(self.workers))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if not 1 <= len(self.workers) <= MAX_WORKERS:
            raise InvalidInput(f"a parallel stage needs 1..{MAX_WORKERS} workers, got {len(self.workers)}")
        if not 1 <= len(self.blocks) <= MAX_BLOCKS:
            raise InvalidInput(f"a parallel stage needs 1..{MAX_BLOCKS} blocks, got {len(self.blocks)}")
        for name in (*self.workers, self.codec, self.model, self.strategy, self.tail_worker, self.tail_worker_id):
            if not isinstance(name, str) or len(name) > MAX_NAME:
                raise InvalidInput(f"{name!r} is not a string of at most {MAX_NAME} characters")
        for i, b in enumerate(self.blocks):
            if not (isinstance(b.start, str) and isinstance(b.end, str)) or max(len(b.start), len(b.end)) > MAX_NAME:
                raise InvalidInput(f"block {i}: start and end must be split-point names of at most {MAX_NAME} characters")
            ok = len(b.shares) == len(self.workers) and all(
                isinstance(s, (int, float)) and math.isfinite(s) and s >= 0 for s in b.shares)
            if not ok or not any(s > 0 for s in b.shares):
                raise InvalidInput(f"block {i} ({b.start}..{b.end}): shares need one finite weight >= 0 per worker "
                                   f"({len(self.workers)}), at least one > 0; got {list(b.shares)}")
            used = sum(1 for s in b.shares if s > 0)
            if not (isinstance(b.grid_cols, int) and 1 <= b.grid_cols <= MAX_WORKERS) or used % b.grid_cols:
                raise InvalidInput(f"block {i} ({b.start}..{b.end}): grid_cols {b.grid_cols!r} must be 1..{MAX_WORKERS} "
                                   f"and divide the {used} workers with a share > 0 (whole rows of tiles)")
            if not isinstance(b.halo, bool) or (b.halo and i == 0):
                raise InvalidInput(f"block {i} ({b.start}..{b.end}): halo_input must be a boolean, and false for the "
                                   "first block (its input comes from the coordinator)")

    def with_workers(self, addresses: tuple[str, ...]) -> ParallelStage:
        """The same stage on other workers (``--parallel-workers``), one address per planned worker."""
        if len(addresses) != len(self.workers):
            raise InvalidInput(f"the plan has {len(self.workers)} workers ({', '.join(self.workers)}); "
                               f"{len(addresses)} addresses were given")
        return ParallelStage(addresses, self.blocks, self.codec, self.model, self.predicted_seconds, self.strategy,
                             self.tail_worker, self.tail_worker_id)

    # -- JSON ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "strategy": self.strategy,
                "workers": list(self.workers), "codec": self.codec, "predicted_seconds": self.predicted_seconds,
                "blocks": [{"start": b.start, "end": b.end, "shares": list(b.shares),
                            "predicted_seconds": b.predicted_seconds, "grid_cols": b.grid_cols, "halo_input": b.halo}
                           for b in self.blocks],
                "tail_worker": self.tail_worker, "tail_worker_id": self.tail_worker_id}

    @classmethod
    def from_json(cls, doc: Any) -> ParallelStage:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise InvalidInput(f"not a parallel plan: expected format {FORMAT!r} version {VERSION}")
        blocks = doc.get("blocks")
        workers = doc.get("workers")
        if not isinstance(blocks, list) or not isinstance(workers, list) or len(blocks) > MAX_BLOCKS:
            raise InvalidInput(f"a parallel plan needs 'workers' and 'blocks' lists (at most {MAX_BLOCKS} blocks)")
        try:
            parsed = tuple(TiledBlock(str(b["start"]), str(b["end"]), tuple(float(s) for s in b["shares"][:MAX_WORKERS + 1]),
                                      float(b.get("predicted_seconds", 0.0)), _int(b.get("grid_cols", 1)),
                                      _bool(b.get("halo_input", False)))
                           for b in blocks)
            return cls(tuple(str(w) for w in workers[:MAX_WORKERS + 1]), parsed, str(doc.get("codec", "raw")),
                       str(doc.get("model", "")), float(doc.get("predicted_seconds", 0.0)), str(doc.get("strategy", "")),
                       _str(doc.get("tail_worker", "")), _str(doc.get("tail_worker_id", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidInput(f"malformed parallel plan: {e!r}") from None

    @classmethod
    def load(cls, path: str | Path) -> ParallelStage:
        text = read_capped(path, MAX_FILE_BYTES, "parallel plan")
        try:
            return cls.from_json(json.loads(text))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidInput(f"parallel plan {path} is not JSON: {e}") from None

    # -- protobuf (tiles.proto ParallelStage) -------------------------------------------------

    def to_proto(self, msg: Any) -> Any:
        """Fill a ``tiles_pb2.ParallelStage`` (passed in: this module does not import generated code)."""
        msg.worker_ids.extend(self.workers)
        msg.worker_addresses.extend(self.workers)
        msg.codec = self.codec
        msg.tail_worker_id, msg.tail_worker_address = self.tail_worker_id, self.tail_worker
        for b in self.blocks:
            msg.blocks.add(start_split=b.start, end_split=b.end, shares=list(b.shares),
                           predicted_seconds=b.predicted_seconds, grid_cols=b.grid_cols, halo_input=b.halo)
        return msg

    @classmethod
    def from_proto(cls, msg: Any, model: str = "") -> ParallelStage:
        if len(msg.worker_addresses) > MAX_WORKERS or len(msg.blocks) > MAX_BLOCKS:
            raise InvalidInput(f"a parallel stage holds at most {MAX_WORKERS} workers and {MAX_BLOCKS} blocks")
        blocks = tuple(TiledBlock(b.start_split, b.end_split, tuple(b.shares[:MAX_WORKERS + 1]), b.predicted_seconds,
                                  max(1, int(b.grid_cols)), bool(b.halo_input)) for b in msg.blocks)
        return cls(tuple(msg.worker_addresses), blocks, msg.codec or "raw", model,
                   tail_worker=msg.tail_worker_address, tail_worker_id=msg.tail_worker_id)
