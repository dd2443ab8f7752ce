"""``edgesplit submit ADDRESS IMAGE...``: the client of the agent's local API (``agent --serve``).

Sends each PNG/JPEG file to ``edgesplit.v1.Agent/Submit`` and prints one line per image (or one JSON
object with ``--json``); a refused image prints the agent's message, not an object, and the command
exits 2. The local API listens on loopback or a unix socket only, so the channel has no TLS.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers

# The agent refuses larger images (runtime.agent.local_api.MAX_IMAGE_BYTES); checked before reading.
MAX_IMAGE_BYTES = 32 * 2**20


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("submit", help="send images to an agent's local API (agent --serve) and print the results")
    p.add_argument("address", help="the agent's --serve address: unix:/run/edgesplit/agent.sock or 127.0.0.1:PORT")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per image (default: 10)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(func=cmd_submit)


def _read(path: str) -> bytes:
    from runtime.contracts.files import read_capped

    return read_capped(path, MAX_IMAGE_BYTES, "image")


def cmd_submit(args: argparse.Namespace) -> int:
    import grpc

    from runtime.contracts.errors import from_rpc_error
    from runtime.proto.edgesplit.v1 import agent_pb2, agent_pb2_grpc

    failed = 0
    with grpc.insecure_channel(args.address) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)  # type: ignore[no-untyped-call]  # generated, unannotated
        for path in args.images:
            try:
                r = stub.Submit(agent_pb2.SubmitRequest(image=_read(path)), timeout=args.timeout)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                print(f"edgesplit: error: {path}: {err.code.name}: {err}", file=sys.stderr)
                failed += 1
                continue
            row = {"image": path, "class_index": r.class_index, "label": r.label, "score": round(r.score, 6),
                   "where": r.where, "fallback_reason": r.fallback_reason, "split": r.split_id,
                   "plan_version": r.plan_version, "wire_bytes": r.wire_bytes,
                   "total_ms": round(r.total_seconds * 1e3, 3)}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                label = r.label or f"class {r.class_index}"
                print(f"{path}: {label} ({r.score:.3f}) on the {r.where} in {row['total_ms']:.1f} ms", flush=True)
    return 2 if failed else 0
