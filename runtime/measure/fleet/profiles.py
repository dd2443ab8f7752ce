"""Board types for the fleet: the bundled efficientnet_lite0 profiles, measured with
``edgesplit profile --model efficientnet_lite0 --runs 10 --warmup 2 --inputs 2`` on the 2-core
development machine (files in ``profiles/``), and one device variant per board type.

Board type ``k`` is the measured device profile with every compute time (block medians and p95s,
transfer encode/decode) multiplied by ``2 + k``: IIoT boards are 2-11x slower than the machine
the profile was measured on, so each type has its own content (its own hash at the planner) and a
plan of its own at a given bandwidth. Transfer sizes stay as measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from runtime.contracts.profile import loads

MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class Fleet:
    """The profiles every simulated agent and worker sends, as compact JSON."""

    model: str
    digest: str
    boards: tuple[str, ...]  # device profile JSON per board type
    edge: str  # the workers' profile JSON


def _bundled(role: str) -> dict[str, Any]:
    text = resources.files("runtime.measure.fleet").joinpath(f"profiles/{MODEL}-{role}.json").read_text()
    document: dict[str, Any] = json.loads(text)
    return document


def _scaled(doc: dict[str, Any], factor: float, machine: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(doc))
    out["machine"] = machine
    out["source"] = f"{doc.get('source', '')}; compute times x{factor:g} (edgesplit bench-planner-fleet board type)"

    def scale_transfers(transfers: list[dict[str, Any]]) -> None:
        for t in transfers:
            t["encode_seconds"] = t.get("encode_seconds", 0.0) * factor
            t["decode_seconds"] = t.get("decode_seconds", 0.0) * factor

    scale_transfers(out.get("input_transfers", []))
    for b in out["blocks"]:
        b["seconds"] *= factor
        if b.get("p95_seconds") is not None:
            b["p95_seconds"] *= factor
        scale_transfers(b.get("transfers", []))
    return out


def _compact(doc: dict[str, Any]) -> str:
    text = json.dumps(doc, separators=(",", ":"))
    loads(text, "bundled fleet profile")  # the planner's own checks, once here: a bad variant fails at start
    return text


def fleet(board_types: int) -> Fleet:
    """The workers' edge profile and ``board_types`` device profiles."""
    device, edge = _bundled("device"), _bundled("edge")
    boards = tuple(_compact(_scaled(device, 2.0 + k, f"fleet-board-{k}")) for k in range(board_types))
    return Fleet(model=device["model"], digest=device.get("model_digest", ""), boards=boards, edge=_compact(edge))
