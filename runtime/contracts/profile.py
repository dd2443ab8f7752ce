"""The benchmark profile: what one machine measured for one model, block by block.

A profile is a versioned JSON document (schema: ``runtime/contracts/schema/profile-v1.schema.json``) that
``edgesplit profile`` writes, the Scission importer converts into, and a person may write or edit
by hand. Block ``i`` runs from split point ``i`` to split point ``i + 1``; cutting after block ``i``
sends that block's output, in one of the ``transfers`` listed for it (a wire codec, optionally
after a Transfer Layer), with the bytes and encode/decode times measured on this machine.

This module is pure Python (no torch), so the planner can load profiles anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from runtime.contracts.errors import InvalidInput
from runtime.contracts.files import read_capped
from runtime.contracts.tiers import TIERS

FORMAT = "edgesplit-profile"
VERSION = 1
ROLES = TIERS  # a profile is measured on one tier
MAX_PROFILE_BYTES = 64 * 2**20  # a 600-block profile with a dozen transfers each is ~1 MB
# Checked while parsing, before the schema or anything else looks at a document (a profile may come
# from the network: the planner parses agents' and workers' profiles).
MAX_BLOCKS = 4096  # blocks in one profile (the bundled models have at most ~250 split points)
MAX_DEPTH = 8  # nesting of objects/arrays (a profile needs 5: root, blocks, block, transfers, transfer)
MAX_INT = 2**53  # largest integer magnitude accepted (bytes, indices): exact in a float, far above any tensor
MAX_SHARED_CHARS = 2**20  # ProfileCache keeps the text of documents up to this size (to hand out one copy)
MAX_NUMBER = 1e9  # largest magnitude of a real number (seconds, fidelity, settings); NaN and Infinity refused


@dataclass(frozen=True)
class Transfer:
    """One way to ship a tensor across a link: a codec, optionally after a Transfer Layer."""

    name: str  # unique within the block, e.g. "int8+lz4" or "tl-ab12cd34+int8+lz4"
    bytes: int  # bytes on the wire per frame, measured on real inputs
    encode_seconds: float = 0.0  # on this machine, when it is the sender (TL encoder + codec)
    decode_seconds: float = 0.0  # on this machine, when it is the receiver (codec + TL decoder)
    codec: str = ""  # wire codec name ("" for a transfer imported from a peer system)
    tl_id: str = ""  # Transfer Layer artifact id, "" for none
    fidelity: float | None = None  # top-1 agreement with the unsplit model; None = not measured


@dataclass(frozen=True)
class Block:
    """The layers between two consecutive split points."""

    index: int
    name: str  # split point after this block (the split id the runtime uses for a cut here)
    seconds: float  # median compute time on this machine
    output_bytes: int  # fp32 bytes of the block's output (the tensor a cut here sends, uncompressed)
    p95_seconds: float | None = None
    first_layer: int = -1  # layer indices (Keras numbering for imported profiles; graph positions otherwise)
    last_layer: int = -1
    param_bytes: int = 0  # weights this block needs in memory
    transfers: tuple[Transfer, ...] = ()


@dataclass(frozen=True)
class Profile:
    machine: str  # name of the machine (or machine class) that was measured
    role: str  # device | edge | cloud
    model: str
    blocks: tuple[Block, ...]
    input_bytes: int  # what the device sends when it runs no block (raw input)
    input_transfers: tuple[Transfer, ...] = ()  # ways to send the input (empty: raw input_bytes)
    model_digest: str = ""
    source: str = ""  # how the profile was made (tool and host, or the peer data it came from)
    created: str = ""  # ISO 8601
    settings: dict[str, Any] = field(default_factory=dict)  # warm-up, runs, threads, torch version...

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def block(self, key: int | str) -> Block:
        for b in self.blocks:
            if b.index == key or b.name == key:
                return b
        raise InvalidInput(f"profile {self.machine}/{self.model} has no block {key!r}")

    def transfers_after(self, n_run: int) -> tuple[Transfer, ...]:
        """Transfers for the tensor that crosses after ``n_run`` blocks (0 = the raw input)."""
        if n_run == 0:
            return self.input_transfers or (Transfer("raw", self.input_bytes, codec="raw"),)
        b = self.blocks[n_run - 1]
        return b.transfers or (Transfer("raw", b.output_bytes, codec="raw"),)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": FORMAT, "version": VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The published JSON Schema of profile documents."""
    text = resources.files("runtime.contracts").joinpath("schema/profile-v1.schema.json").read_text()
    document: dict[str, Any] = json.loads(text)
    return document


@lru_cache(maxsize=1)
def _validator() -> Any:
    """The schema's validator, checked and compiled once (``jsonschema.validate`` re-checks the schema
    and builds a validator on every call: most of its ~90 ms on an EfficientNet profile)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema())
    cls.check_schema(schema())
    return cls(schema())


def _transfer(d: dict[str, Any]) -> Transfer:
    return Transfer(name=d["name"], bytes=int(d["bytes"]), encode_seconds=float(d.get("encode_seconds", 0.0)),
                    decode_seconds=float(d.get("decode_seconds", 0.0)), codec=d.get("codec", ""),
                    tl_id=d.get("tl_id", ""), fidelity=d.get("fidelity"))


def from_dict(d: Any, where: str = "profile") -> Profile:
    """Validate a decoded JSON document against the schema and the rules it cannot express."""
    import jsonschema

    if not isinstance(d, dict):
        raise InvalidInput(f"{where}: a profile is a JSON object, not {type(d).__name__}")
    if d.get("format") != FORMAT:
        raise InvalidInput(f"{where}: not an edgesplit profile (format is {d.get('format')!r}, expected {FORMAT!r})")
    if d.get("version") != VERSION:
        raise InvalidInput(f"{where}: profile version {d.get('version')!r} is not supported (this edgesplit reads "
                           f"version {VERSION}); re-run 'edgesplit profile' or convert the file")
    error = jsonschema.exceptions.best_match(_validator().iter_errors(d))  # the error jsonschema.validate raises
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise InvalidInput(f"{where}: {path}: {error.message}")
    blocks = []
    for i, b in enumerate(d["blocks"]):
        if b["index"] != i:
            raise InvalidInput(f"{where}: blocks/{i}: index is {b['index']}, expected {i} (blocks are in order from 0)")
        names = [t["name"] for t in b.get("transfers", [])]
        if len(set(names)) != len(names):
            raise InvalidInput(f"{where}: blocks/{i}: transfer names repeat: {names}")
        blocks.append(Block(index=i, name=b["name"], seconds=float(b["seconds"]), output_bytes=int(b["output_bytes"]),
                            p95_seconds=b.get("p95_seconds"), first_layer=int(b.get("first_layer", -1)),
                            last_layer=int(b.get("last_layer", -1)), param_bytes=int(b.get("param_bytes", 0)),
                            transfers=tuple(_transfer(t) for t in b.get("transfers", []))))
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        raise InvalidInput(f"{where}: block names must be unique (they are the split ids)")
    for b in blocks:
        for v in (b.seconds, *(t.encode_seconds for t in b.transfers), *(t.decode_seconds for t in b.transfers)):
            if not math.isfinite(v):
                raise InvalidInput(f"{where}: block {b.index}: times must be finite")
    return Profile(machine=d["machine"], role=d["role"], model=d["model"], blocks=tuple(blocks),
                   input_bytes=int(d["input_bytes"]),
                   input_transfers=tuple(_transfer(t) for t in d.get("input_transfers", [])),
                   model_digest=d.get("model_digest", ""), source=d.get("source", ""), created=d.get("created", ""),
                   settings=dict(d.get("settings", {})))


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 16 or abs(int(text)) > MAX_INT:
        raise ValueError(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is outside +-2^53")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or abs(value) > MAX_NUMBER:
        raise ValueError(f"number {text[:24]} is outside +-{MAX_NUMBER:g}")
    return value


def _constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a profile may hold (NaN and Infinity are refused)")


def _depth(d: Any) -> int:
    """Nesting depth of a decoded document, without recursion."""
    deepest, stack = 0, [(d, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                break
            stack.extend((v, level + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def parse_strict(text: str | bytes, where: str = "profile") -> Any:
    """Decode a profile document under the limits above (size, integer range, finite numbers, depth,
    block count); InvalidInput naming the limit otherwise. Nothing else looks at the text first."""
    if len(text) > MAX_PROFILE_BYTES:
        raise InvalidInput(f"{where}: {len(text)} bytes is above the {MAX_PROFILE_BYTES}-byte profile limit")
    try:
        d = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{where}: not valid JSON: {e}") from None
    except ValueError as e:
        raise InvalidInput(f"{where}: {e}") from None
    except RecursionError:
        raise InvalidInput(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    if _depth(d) > MAX_DEPTH:
        raise InvalidInput(f"{where}: nested deeper than {MAX_DEPTH} levels (a profile needs 5)")
    blocks = d.get("blocks") if isinstance(d, dict) else None
    if isinstance(blocks, list) and len(blocks) > MAX_BLOCKS:
        raise InvalidInput(f"{where}: {len(blocks)} blocks is above the limit of {MAX_BLOCKS}; profile the model "
                           "itself ('edgesplit profile'), one block per split point")
    return d


def loads(text: str | bytes, where: str = "profile") -> Profile:
    return from_dict(parse_strict(text, where), where)


class ProfileCache:
    """Profiles parsed and checked once per content: the SHA-256 of a document's bytes -> its
    :class:`Profile`, the ``size`` most recently used kept (a fleet's agents of one board type send
    the same document). A document seen before is not parsed again; one not seen (or evicted) goes
    through :func:`loads` and every limit of :func:`parse_strict`. An invalid document is never
    kept, so it is refused every time. The profiles handed out are shared: treat them (their
    ``settings`` too) as read-only. :meth:`shared` hands out one copy of a document's text, so
    records that keep it (an agent's registration) do not each hold their own. Safe to use from
    several threads."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a profile cache holds at least one profile, not {size}")
        self.size = size
        self._data: OrderedDict[bytes, tuple[Profile, str]] = OrderedDict()  # key -> (profile, its text or "")
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(text: str | bytes) -> bytes:
        """The content key of a document (SHA-256 of its UTF-8 bytes)."""
        return hashlib.sha256(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text).digest()

    def peek(self, key: bytes) -> Profile | None:
        """The profile held for ``key``, or None (counts nothing)."""
        with self._lock:
            entry = self._data.get(key)
            return entry[0] if entry is not None else None

    def held(self, key: bytes) -> tuple[Profile, str] | None:
        """The checked profile and its text held for ``key`` (a hit: it moves to the recent end), or None
        when that content was never checked here, was evicted, or its text is not kept (above
        MAX_SHARED_CHARS). A key names only content this cache parsed and checked itself."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None or not entry[1]:
                return None
            self._data.move_to_end(key)
            return entry

    def shared(self, text: str, key: bytes | None = None) -> str:
        """The document held for ``text``'s content (one string object for all who sent it), or ``text``
        (``key``: its :meth:`key`, when the caller has it already)."""
        with self._lock:
            entry = self._data.get(key if key is not None else self.key(text))
        return entry[1] if entry is not None and entry[1] == text else text

    def loads(self, text: str | bytes, where: str = "profile", key: bytes | None = None) -> Profile:
        """:func:`loads` of ``text``, parsed only the first time its content is seen (``key``: its
        :meth:`key`, when the caller has it already)."""
        if len(text) > MAX_PROFILE_BYTES:  # before hashing it
            raise InvalidInput(f"{where}: {len(text)} bytes is above the {MAX_PROFILE_BYTES}-byte profile limit")
        key = key if key is not None else self.key(text)
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                self._data.move_to_end(key)
                self.hits += 1
                return entry[0]
        p = loads(text, where)
        with self._lock:
            self.misses += 1
            self._data[key] = (p, text if isinstance(text, str) and len(text) <= MAX_SHARED_CHARS else "")
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return p

    def __len__(self) -> int:
        return len(self._data)


def load(path: str | Path) -> Profile:
    return loads(read_capped(path, MAX_PROFILE_BYTES, "profile"), str(path))
