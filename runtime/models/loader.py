"""A model ready to split: its spec, traced graph, split points and weight fingerprint."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from runtime.models.registry import build_model, get_spec, state_dict_digest
from runtime.models.slicing import SlicedModel, SplitPoint
from runtime.models.spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    spec: ModelSpec
    sliced: SlicedModel
    digest: str  # fingerprint of the weights, sent with every frame
    _heads: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)
    _tails: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)
    _segments: dict[tuple[str, str], torch.fx.GraphModule] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        h, w = self.spec.input_size
        return (1, 3, h, w)

    def split(self, key: str | int) -> SplitPoint:
        return self.sliced.split(key)

    def head(self, key: str | int) -> torch.nn.Module:
        sp = self.split(key)
        with self._lock:
            if sp.name not in self._heads:
                self._heads[sp.name] = self.sliced.head(sp.name)
            return self._heads[sp.name]

    def tail(self, key: str | int) -> torch.nn.Module:
        sp = self.split(key)
        with self._lock:
            if sp.name not in self._tails:
                self._tails[sp.name] = self.sliced.tail(sp.name)
            return self._tails[sp.name]

    def segment(self, a: str | int, b: str | int) -> torch.fx.GraphModule:
        """Module from the tensor at split point ``a`` to the one at ``b`` (``a < b``), cached."""
        key = (self.split(a).name, self.split(b).name)
        with self._lock:
            if key not in self._segments:
                self._segments[key] = self.sliced.segment(*key)
            return self._segments[key]

    @property
    def full(self) -> torch.nn.Module:
        return self.sliced.graph_module


def load_model(name: str) -> LoadedModel:
    """Build, trace and fingerprint a bundled or user model (see ``runtime.models.get_spec``)."""
    spec = get_spec(name)
    model = build_model(spec)
    h, w = spec.input_size
    sliced = SlicedModel(model, torch.zeros(1, 3, h, w), name=spec.name)
    digest = state_dict_digest(model)[:16]
    logger.info("loaded model %s (%d split points, weights %s)", spec.name, len(sliced.split_points), digest)
    return LoadedModel(spec=spec, sliced=sliced, digest=digest)
