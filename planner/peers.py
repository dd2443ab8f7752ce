"""Import published peer benchmark data (Scission, ScissionTL) as edgesplit profiles and networks.

Scission's files give, per machine and Keras model, the blocks between valid split points with
their Keras layer range, mean seconds and output size (float32 .npy bytes). ScissionTL adds per
block the size after its parameter-free 2x2 max-pool Transfer Layer and the down-sample,
up-sample and data-conversion times (-1 where no TL applies). A TL transfer therefore costs the
sender down-sample + conversion and the receiver up-sample + conversion, as in ScissionTL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.contracts.costmodel import Link, Network
from runtime.contracts.errors import InvalidInput
from runtime.contracts.files import read_capped
from runtime.contracts.profile import Block, Profile, Transfer
from runtime.contracts.tiers import TIERS

RAW_INPUT_BYTES = 150_000  # Scission: "when the device runs nothing, the raw input counts as 0.15 MB"
TL_NAME = "tl:maxpool2x2"
TL_ID = "scissiontl-maxpool2x2"
MAX_PEER_FILE_BYTES = 256 * 2**20
MAX_NETWORK_FILE_BYTES = 16 * 2**20  # a network file (--network): read at most this (a link is ~100 bytes)


def _read(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        d = json.loads(read_capped(p, MAX_PEER_FILE_BYTES, "peer benchmark file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{p}: not valid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("machines"), dict):
        raise InvalidInput(f"{p}: not a peer benchmark file (no 'machines' object)")
    return d


def _num(b: dict[str, object], key: str, where: str) -> float:
    v = b.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise InvalidInput(f"{where}: {key} must be a number, got {v!r}")
    return float(v)


def _block(i: int, b: dict[str, object], where: str) -> Block:
    where = f"{where} block {i}"
    if b.get("block") != i:
        raise InvalidInput(f"{where}: blocks must be numbered 0, 1, ... in order (got {b.get('block')!r})")
    seconds, out = _num(b, "seconds", where), int(_num(b, "output_bytes", where))
    if seconds < 0 or out < 0:
        raise InvalidInput(f"{where}: negative time or size")
    transfers = [Transfer("raw", out, codec="raw")]
    if "tl_output_size" in b:
        down, up, conv = (_num(b, k, where) for k in ("downsample_time", "upsample_time", "dataconvert_time"))
        tl_bytes = int(_num(b, "tl_output_size", where))
        if min(down, up, conv) >= 0 and tl_bytes > 0:  # -1 marks blocks where the TL does not apply
            transfers.append(Transfer(TL_NAME, tl_bytes, encode_seconds=down + conv, decode_seconds=up + conv,
                                      tl_id=TL_ID))
    first, last = int(_num(b, "first_layer", where)), int(_num(b, "last_layer", where))
    return Block(index=i, name=f"block{i}", seconds=seconds, output_bytes=out, first_layer=first, last_layer=last,
                 transfers=tuple(transfers))


def import_profiles(path: str | Path) -> dict[tuple[str, str], Profile]:
    """Every (machine, model) in a Scission or ScissionTL benchmark file, as profiles."""
    d = _read(path)
    source = f"imported from {Path(path).name}: {d.get('source', '')}"[:1000]
    out: dict[tuple[str, str], Profile] = {}
    for machine, m in d["machines"].items():
        tier = m.get("tier")
        if tier not in TIERS:
            raise InvalidInput(f"{path}: machine {machine!r} has tier {tier!r}; expected device, edge or cloud")
        for model, blocks in m.get("models", {}).items():
            where = f"{path}: {machine}/{model}"
            if not isinstance(blocks, list) or not blocks:
                raise InvalidInput(f"{where}: no blocks")
            out[(machine, model)] = Profile(
                machine=machine, role=tier, model=model, blocks=tuple(_block(i, b, where) for i, b in enumerate(blocks)),
                input_bytes=RAW_INPUT_BYTES, source=source, settings={"peer": True})
    return out


def _links(entries: Any, where: str) -> Network:
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        raise InvalidInput(f"{where}: a network is a list of links")
    links = {}
    for e in entries:
        try:
            links[(e["source"], e["destination"])] = Link.from_mbps(float(e["rtt_ms"]), float(e["bandwidth_mbps"]))
        except (KeyError, TypeError, ValueError):
            raise InvalidInput(f"{where}: a link needs source, destination, rtt_ms and bandwidth_mbps: {e!r}") from None
    return Network(links)


def import_network(path: str | Path, name: str = "default") -> Network:
    """A network from a peer file: Scission's named ``networks`` or ScissionTL's single ``network``."""
    d = _read(path)
    if "networks" in d:
        if name not in d["networks"]:
            raise InvalidInput(f"{path}: no network {name!r}; it has {', '.join(d['networks'])}")
        return _links(d["networks"][name], f"{path}: network {name}")
    if "network" in d:
        return _links(d["network"], f"{path}: network")
    raise InvalidInput(f"{path}: no network description")


def load_network(path: str | Path) -> Network:
    """A network file: ``{"links": [{"source", "destination", "rtt_ms", "bandwidth_mbps"}, ...]}``."""
    p = Path(path)
    data = read_capped(p, MAX_NETWORK_FILE_BYTES, "network file")  # TooLarge / InvalidInput
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, RecursionError) as e:
        raise InvalidInput(f"{p}: not a network file ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{p}: not valid JSON: {e}") from None
    return _links(d.get("links") if isinstance(d, dict) else d, str(p))


def network_to_json(network: Network) -> str:
    return json.dumps({"links": [
        {"source": s, "destination": t, "rtt_ms": round(link.rtt_seconds * 1e3, 6),
         "bandwidth_mbps": round(link.bandwidth_bytes_per_second / 125_000.0, 6)}
        for (s, t), link in network.links.items()]}, indent=1)
