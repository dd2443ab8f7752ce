"""The tails a worker holds: loaded on first use per (model, split), middle slices for chained frames, and
Transfer Layer decoders with theirs (runtime.worker.service runs frames through them)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from runtime.contracts.errors import EdgesplitError, NotFound, Overloaded, PreconditionFailed
from runtime.models import get_spec, list_models
from runtime.models.loader import LoadedModel, load_model
from runtime.models.slicing import SplitPoint
from runtime.worker.allowlist import served_models
from runtime.worker.config import WorkerConfig
from runtime.worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


@dataclass
class Tail:
    model: LoadedModel
    split: SplitPoint
    module: torch.nn.Module
    decoder: torch.nn.Module | None = None  # a Transfer Layer's decoder, run before the tail
    tl_id: str = ""
    encoded_shape: tuple[int, ...] | None = None  # the TL's wire shape (batch 1); None: the split's
    entropy: object | None = None  # a transform TL's entropy model: decodes CODEC_ANS frames
    end: SplitPoint | None = None  # chained frames: the slice ends here and is forwarded; None: the whole tail
    # whether decode + tail wrote into the decoded input (its version counter moved): None until a frame, decoded
    # to a copy, has shown it; False: raw frames are decoded as views of the received bytes (no copy)
    writes_input: bool | None = None
    compute_seconds: float | None = None  # the last frame's decode + tail per batch element (inline compute); None: none yet

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.encoded_shape or self.split.out_shape


class TailCache:
    """Tails loaded on first use per (model, split) and kept; each model is built once."""

    def __init__(self, config: WorkerConfig, executor: Executor, metrics: WorkerMetrics):
        self._executor = executor
        self._metrics = metrics
        self._config = config
        self._bundled = set(list_models())
        # user models are addressed by their id ("stem:factory"); only those configured may load
        self._user: dict[str, str] = {get_spec(s).name: s for s in config.models}
        self.served = served_models(config, self._bundled | set(self._user))  # what callers may name (--serve-models)
        self._models: dict[str, LoadedModel] = {}
        self._tails: dict[tuple[str, str], Tail] = {}
        self._slices: dict[tuple[str, str, str, str], Tail] = {}  # (model, split, end, TL id): middle slices
        self._locks: dict[object, asyncio.Lock] = {}  # one per model, tail and slice key: each is built once
        self.tls: dict[str, Tail] = {}  # by TL id: decoder + tail (see load_tls)

    async def load_tls(self, paths) -> None:
        """Load Transfer Layer artifacts (their models first); each is checked against the weights here."""
        from runtime.transfer.artifact import load_tl, read_manifest, resolve_path

        loop = asyncio.get_running_loop()
        for path in paths:
            manifest = read_manifest(resolve_path(path))
            loaded = await self.model(manifest["model"])
            art = await loop.run_in_executor(self._executor, lambda p=path, m=loaded: load_tl(p, loaded=m))
            self.tls[art.tl_id] = Tail(loaded, art.split, art.tail, art.tl.decoder, art.tl_id, art.encoded_shape,
                                       art.tl.entropy_model)
            logger.info("loaded Transfer Layer %s (%s x%s) for %s@%s", art.tl_id, art.tl.kind, art.tl.ratio,
                        loaded.name, art.split.name)

    def known(self) -> list[str]:
        return sorted(self._bundled | set(self._user))

    def loaded(self, model_id: str, split_id: str) -> Tail | None:
        """The tail of ``get`` if it is loaded already (None: ``get`` would load it)."""
        return self._tails.get((model_id, split_id))

    async def get(self, model_id: str, split_id: str) -> Tail:
        tail = self._tails.get((model_id, split_id))
        if tail is not None:
            return tail
        loaded = await self.model(model_id)
        sp = loaded.split(split_id)  # NotFound with the valid range
        key = (model_id, sp.name)
        async with self._locks.setdefault(("tail", *key), asyncio.Lock()):  # concurrent first frames wait for one build
            if key not in self._tails:
                module = await asyncio.get_running_loop().run_in_executor(self._executor, loaded.tail, sp.name)
                self._tails[key] = Tail(loaded, sp, module)
                self._metrics.loaded_tails.set(len(self._tails) + len(self._slices))
                logger.info("loaded tail %s@%s", model_id, sp.name)
        self._tails[(model_id, split_id)] = self._tails[key]
        return self._tails[key]

    async def sliced(self, tail: Tail, end: SplitPoint) -> Tail:
        """``tail`` cut short: [its split, ``end``), for a chained frame; built once per (model, split, end, TL)."""
        key = (tail.model.name, tail.split.name, end.name, tail.tl_id)
        async with self._locks.setdefault(("slice", *key), asyncio.Lock()):
            if key not in self._slices:
                loop = asyncio.get_running_loop()
                module = await loop.run_in_executor(self._executor, tail.model.segment, tail.split.name, end.name)
                self._slices[key] = dataclasses.replace(tail, module=module, end=end)
                self._metrics.loaded_tails.set(len(self._tails) + len(self._slices))
                logger.info("loaded slice %s@%s..%s", tail.model.name, tail.split.name, end.name)
        return self._slices[key]

    async def model(self, model_id: str) -> LoadedModel:
        """The loaded model, built once on first use; NotFound unless bundled or configured."""
        if model_id in self._models:
            return self._models[model_id]
        if model_id in self._bundled:
            source = model_id
        elif model_id in self._user:
            source = self._user[model_id]
        else:
            raise NotFound(
                f"model {model_id!r} is not served here; bundled: {', '.join(sorted(self._bundled))}"
                + (f"; user models: {', '.join(sorted(self._user))}" if self._user else "")
                + ". Start the worker with --model path/to/file.py:factory to serve a user model"
            )
        self.served.check(model_id)  # PERMISSION_DENIED unless --serve-models (or the configuration) names it
        lock = self._locks.setdefault(model_id, asyncio.Lock())
        async with lock:
            if model_id not in self._models and len(self._models) >= self._config.max_loaded_models:
                raise Overloaded(f"this worker holds {len(self._models)} models ({', '.join(sorted(self._models))}), "
                                 f"its --max-loaded-models; send {model_id!r} to another worker or run it locally")
            if model_id not in self._models:
                loop = asyncio.get_running_loop()
                try:
                    self._models[model_id] = await loop.run_in_executor(self._executor, load_model, source)
                except EdgesplitError:
                    raise
                except Exception as e:
                    logger.exception("could not load model %s", model_id)
                    raise PreconditionFailed(f"model {model_id!r} failed to load on this worker: {e}") from e
        return self._models[model_id]
