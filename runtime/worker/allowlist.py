"""Which models a worker serves to callers (``--serve-models``): a frame or ``Prepare`` naming another model
is refused PERMISSION_DENIED before anything is loaded, so a caller cannot make the worker load every
bundled model (each costs memory and start-up time).

The list, in this order:

* ``--serve-models MODEL`` (repeatable; TOML ``serve_models = [...]``, ``EDGESPLIT_WORKER_SERVE_MODELS``): exactly those;
  ``--serve-models all`` allows every bundled model and every configured user model;
* else the models the worker's configuration names: ``--model`` (user models), ``--preload``,
  ``--tl`` (each artifact's model) and ``--profiles`` (each profile's model): a worker deployed for
  some models serves those;
* else (it names none: the loopback quick start, ``edgesplit demo``) every bundled model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from runtime.contracts.errors import InvalidInput, PermissionDenied

logger = logging.getLogger(__name__)

ALL = "all"  # --serve-models all: every bundled and configured model


@dataclass(frozen=True)
class ServedModels:
    """The models callers may name; ``allowed`` None means every bundled and configured model."""

    allowed: frozenset[str] | None
    source: str  # where the list came from, for messages

    def allows(self, model_id: str) -> bool:
        return self.allowed is None or model_id in self.allowed

    def check(self, model_id: str) -> None:
        """PermissionDenied, with what to change, unless ``model_id`` is served."""
        if self.allows(model_id):
            return
        allowed = ", ".join(sorted(self.allowed or ())) or "none"
        raise PermissionDenied(f"model {model_id!r} is not served by this worker (it serves {allowed}: {self.source}); "
                               f"send it to a worker that serves it, or start this one with --serve-models {model_id} "
                               f"(--serve-models {ALL} for every bundled model)")


def _named(config) -> dict[str, str]:
    """model id -> the setting that names it, from the worker's configuration."""
    from runtime.contracts import profile as profiles
    from runtime.models import get_spec
    from runtime.transfer.artifact import read_manifest, resolve_path

    named: dict[str, str] = {}
    for spec in config.models:
        named.setdefault(get_spec(spec).name, "--model")
    for item in config.preload:
        named.setdefault(item.split("@", 1)[0], "--preload")
    for path in config.tls:
        named.setdefault(str(read_manifest(resolve_path(path)).get("model", "")), "--tl")
    for path in config.profiles:
        named.setdefault(profiles.load(path).model, "--profiles")
    named.pop("", None)
    return named


def served_models(config, known: Iterable[str]) -> ServedModels:
    """The worker's served models from its configuration; ``known`` = bundled + configured user models.
    InvalidInput for a --serve-models entry that names no known model."""
    known = set(known)
    serve = tuple(s.strip() for s in config.serve_models if s.strip())
    if ALL in serve:
        served = ServedModels(None, f"--serve-models {ALL}")
    elif serve:
        unknown = sorted(set(serve) - known)
        if unknown:
            raise InvalidInput(f"--serve-models names {', '.join(unknown)}, which this worker does not have; bundled and "
                               f"configured: {', '.join(sorted(known))} (a user model needs --model path.py:factory)")
        served = ServedModels(frozenset(serve), "--serve-models")
    else:
        named = _named(config)
        if named:
            settings = ", ".join(sorted(set(named.values())))
            served = ServedModels(frozenset(named), f"the models named by its {settings}")
        else:
            served = ServedModels(None, "it names no model: every bundled one")
    logger.info("serving %s (%s)", "every bundled and configured model" if served.allowed is None
                else ", ".join(sorted(served.allowed)), served.source)
    return served
