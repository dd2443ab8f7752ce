"""TL artifacts on disk: ``<dir>/<tl_id>.safetensors`` (weights) + ``<dir>/<tl_id>.json`` (manifest).

The id is ``"tl-" + 12 hex`` of a SHA-256 over the weights (names, dtypes, shapes, bytes) and the
identity fields of the manifest (format version, model id and weights digest, split, input
shape, kind, ratio, fine-tuned tail): what a decoder must match to be used. Measured figures and
training settings are in the manifest but not in the id, so ``edgesplit tl eval`` can write its
figures back (:func:`record_measurements`) and the artifact still loads under the same id.
Loading checks everything and reads weights with safetensors only (never pickle).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runtime.contracts.errors import EdgesplitError, InvalidInput, PreconditionFailed
from runtime.contracts.files import read_capped
from runtime.models.loader import LoadedModel
from runtime.models.slicing import SplitPoint
from runtime.transfer.layers import KINDS, TransferLayer

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"  # TLs shipped in the package (see bundled_tl)
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_MANIFEST_BYTES = 1 << 20  # a TL manifest is ~2 KB; a larger file is refused unread
_IDENTITY = ("format_version", "model", "model_digest", "split", "input_shape", "kind", "ratio", "finetune_tail")


@dataclass
class LoadedTL:
    tl_id: str
    tl: TransferLayer
    manifest: dict
    model: LoadedModel
    split: SplitPoint
    path: Path

    @property
    def encoded_shape(self) -> tuple[int, ...]:
        return (1, *self.tl.encoded_shape)

    @property
    def tail(self) -> torch.nn.Module:
        own = getattr(self.tl, "tail", None)
        return own if own is not None else self.model.tail(self.split.name)


def _tensors(tl: TransferLayer) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in tl.state_dict().items()}


def compute_id(tensors: dict[str, torch.Tensor], manifest: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: manifest.get(k) for k in _IDENTITY}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"|{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "tl-" + h.hexdigest()[:12]


def save_tl(tl: TransferLayer, loaded: LoadedModel, split: SplitPoint, out_dir: str | os.PathLike, *,
            fidelity: dict | None = None, bytes_per_frame: dict | None = None,
            training: dict | None = None) -> tuple[str, Path]:
    """Write the artifact; returns ``(tl_id, path of the manifest)``."""
    from safetensors.torch import save_file

    tensors = _tensors(tl)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": loaded.name,
        "model_digest": loaded.digest,
        "split": split.name,
        "split_index": split.index,
        "input_shape": list(split.out_shape),
        "encoded_shape": [1, *tl.encoded_shape],
        "kind": tl.kind,
        "ratio": tl.ratio,
        "finetune_tail": getattr(tl, "tail", None) is not None,
        "fidelity": fidelity or {},
        "bytes_per_frame": bytes_per_frame or {},
        "training": training or {},
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
    }
    tl_id = compute_id(tensors, manifest)
    manifest = {"tl_id": tl_id, **manifest}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"{tl_id}.safetensors"), metadata={"tl_id": tl_id})
    path = out / f"{tl_id}.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return tl_id, path


MEASURED = ("fidelity", "bytes_per_frame")  # the manifest sections a measurement may rewrite


def record_measurements(path: str | os.PathLike, **sections: dict) -> dict:
    """Replace measured sections (``fidelity=...``, ``bytes_per_frame=...``) of the manifest at
    ``path``, atomically (temporary file + rename); returns the new manifest.

    Only :data:`MEASURED` sections may change: they are outside the id, so the content hash still
    validates. ``fidelity["top1_agreement"]`` (no codec) is the figure the profiler reads.
    """
    bad = sorted(set(sections) - set(MEASURED))
    if bad:
        raise InvalidInput(f"only {', '.join(MEASURED)} may be rewritten in a manifest, not {', '.join(bad)}")
    path = Path(path)
    manifest = read_manifest(path)
    before = {k: manifest.get(k) for k in ("tl_id", *_IDENTITY)}
    manifest.update({k: v for k, v in sections.items() if v is not None})
    if {k: manifest.get(k) for k in ("tl_id", *_IDENTITY)} != before:  # pragma: no cover - guarded above
        raise InvalidInput("a measurement must not change a manifest's identity fields")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def bundled_tl(model: str) -> Path | None:
    """The manifest of the TL shipped with edgesplit for ``model`` (the demo's default), or None."""
    for p in sorted(BUNDLED_DIR.glob("tl-*.json")):
        try:
            if read_manifest(p)["model"] == model:
                return p
        except InvalidInput:
            continue
    return None


def resolve_path(path_or_id: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """The manifest path for a manifest/weights path, a directory + id, or an id in ``directory``
    (an id found nowhere else is looked up among the bundled TLs)."""
    p = Path(path_or_id)
    if p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    elif p.suffix != ".json":
        p = Path(directory or ".") / f"{path_or_id}.json"
        if not p.is_file() and (BUNDLED_DIR / f"{path_or_id}.json").is_file():
            p = BUNDLED_DIR / f"{path_or_id}.json"
    if not p.is_file():
        raise InvalidInput(f"Transfer Layer manifest {str(p)!r} not found; give the .json (or .safetensors) path "
                           "written by 'edgesplit tl train', or an id with its directory")
    return p


def read_manifest(path: Path) -> dict:
    text = read_capped(path, MAX_MANIFEST_BYTES, "Transfer Layer manifest")  # TooLarge / InvalidInput
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidInput(f"Transfer Layer manifest {str(path)!r} is not valid JSON ({e}); "
                           "re-create it with 'edgesplit tl train'") from None
    if not isinstance(manifest, dict):
        raise InvalidInput(f"Transfer Layer manifest {str(path)!r} must be a JSON object")
    version = manifest.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise InvalidInput(f"Transfer Layer {str(path)!r} has format_version {version!r}; this edgesplit reads "
                           f"{', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade edgesplit or re-train the TL")
    missing = [k for k in ("tl_id", *_IDENTITY) if k not in manifest]
    if missing:
        raise InvalidInput(f"Transfer Layer manifest {str(path)!r} lacks {', '.join(missing)}; re-create it")
    if manifest["kind"] not in KINDS:
        raise InvalidInput(f"Transfer Layer {str(path)!r} has unknown kind {manifest['kind']!r}; "
                           f"known: {', '.join(KINDS)}")
    return manifest


def load_tl(path_or_id: str | os.PathLike, directory: str | os.PathLike | None = None, *,
            loaded: LoadedModel | None = None) -> LoadedTL:
    """Read and check an artifact. ``loaded`` is the model it must belong to (loaded by name when None).

    InvalidInput: unreadable/corrupted files, unknown version or kind, tensors that do not match
    what the kind builds, id mismatch. PreconditionFailed: a different model or weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_path(path_or_id, directory)
    manifest = read_manifest(path)
    if loaded is None:
        from runtime.models.loader import load_model

        loaded = load_model(manifest["model"])
    if manifest["model"] != loaded.name or manifest["model_digest"] != loaded.digest:
        raise PreconditionFailed(
            f"Transfer Layer {manifest['tl_id']} was trained for {manifest['model']} weights "
            f"{manifest['model_digest']}, but the model here is {loaded.name} weights {loaded.digest}; "
            "re-train the TL for these weights ('edgesplit tl train')")
    try:
        split = loaded.split(manifest["split"])
    except EdgesplitError as e:
        raise PreconditionFailed(f"Transfer Layer {manifest['tl_id']}: {e}") from None
    if list(split.out_shape) != list(manifest["input_shape"]):
        raise PreconditionFailed(f"Transfer Layer {manifest['tl_id']} expects input {manifest['input_shape']} at "
                                 f"{split.name}, but the model gives {list(split.out_shape)}")
    weights = path.with_suffix(".safetensors")
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError, Exception) as e:
        raise InvalidInput(f"cannot read Transfer Layer weights {str(weights)!r} ({type(e).__name__}: {e}); "
                           "the file is missing or corrupted: re-create it with 'edgesplit tl train'") from None
    tl = TransferLayer(manifest["kind"], split.out_shape, manifest["ratio"])
    if manifest["finetune_tail"]:
        tl.tail = copy.deepcopy(loaded.tail(split.name))
    want = {k: tuple(v.shape) for k, v in tl.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:6]
        raise InvalidInput(f"Transfer Layer weights {str(weights)!r} do not match a {manifest['kind']} x"
                           f"{manifest['ratio']} TL for input {list(split.out_shape)}: differing (name, shape) "
                           f"{diff}; re-create it with 'edgesplit tl train'")
    tl.load_state_dict(tensors, strict=True)
    tl.eval()
    tl.requires_grad_(False)
    if compute_id(_tensors(tl), manifest) != manifest["tl_id"]:
        raise InvalidInput(f"Transfer Layer {str(path)!r}: weights or manifest changed after it was written "
                           f"(content hash does not match id {manifest['tl_id']}); re-create it")
    if path.stem != manifest["tl_id"]:
        raise InvalidInput(f"Transfer Layer file {path.name} holds id {manifest['tl_id']}; keep the name "
                           f"{manifest['tl_id']}.json")
    if not math.prod(tl.encoded_shape):  # pragma: no cover - guarded by feature_shape
        raise InvalidInput("empty encoded shape")
    return LoadedTL(manifest["tl_id"], tl, manifest, loaded, split, path)


def list_tls(directory: str | os.PathLike) -> list[dict]:
    """Manifests in ``directory`` (unreadable ones are reported with an ``error``), by id."""
    rows = []
    for p in sorted(Path(directory).glob("tl-*.json")):
        try:
            rows.append(read_manifest(p))
        except InvalidInput as e:
            rows.append({"tl_id": p.stem, "error": str(e)})
    return rows
