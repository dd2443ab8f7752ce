"""``edgesplit health-check HOST:PORT``: exit 0 only when the daemon is SERVING."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from runtime.cli.common import add_client_security_flags, client_transport

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("health-check", help="ask a daemon's gRPC health service; exit 0 only when SERVING")
    p.add_argument("address", help="HOST:PORT or unix:/path.sock")
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    add_client_security_flags(p)
    p.set_defaults(func=cmd_health_check)


def cmd_health_check(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with client_transport(args).sync_channel(args.address) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as e:
        print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.address}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1
