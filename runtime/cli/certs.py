"""``edgesplit certs ca|issue|token|revoke``: a site CA, per-role certificates and bearer tokens for a quick start.

    edgesplit certs ca --out pki/
    edgesplit certs issue --ca-dir pki/ --role worker --id edge-1 --host edge-1.plant --host 10.0.0.5 --out pki/
    edgesplit certs issue --ca-dir pki/ --role agent --id press-7 --out pki/
    edgesplit certs token --role operator --id alice --out alice.token --tokens-file pki/tokens
    edgesplit certs revoke --ca-dir pki/ pki/agent-press-7.pem      # adds it to pki/crl.pem (daemons: --crl-file)
    edgesplit certs revoke --ca-dir pki/                             # writes or re-signs pki/crl.pem (publish before it expires)

Certificates name the role and id as the SAN URI ``spiffe://edgesplit/ROLE/ID`` (runtime.tools.pki);
README.md ("Security") shows the openssl equivalent.
"""

from __future__ import annotations

import argparse
import os
import secrets
from typing import TYPE_CHECKING

from runtime.wire.security import ROLES

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("certs", help="create a site CA, per-role certificates and bearer tokens (mTLS quick start)")
    csub = p.add_subparsers(dest="certs_command", required=True)
    ca = csub.add_parser("ca", help="create a site CA: OUT/ca.pem and OUT/ca.key (keep the key offline)")
    ca.add_argument("--out", required=True, metavar="DIR", help="directory to write ca.pem and ca.key into")
    ca.add_argument("--name", default="edgesplit site CA", help="the CA's common name (default: edgesplit site CA)")
    ca.add_argument("--days", type=int, default=3650, help="validity in days (default: 3650)")
    ca.set_defaults(func=cmd_ca)
    iss = csub.add_parser("issue", help="issue a certificate for one agent, worker, operator or planner: OUT/ROLE-ID.pem/.key")
    iss.add_argument("--ca-dir", required=True, metavar="DIR", help="directory holding ca.pem and ca.key")
    iss.add_argument("--role", required=True, choices=ROLES, help="the holder's role")
    iss.add_argument("--id", required=True, help="worker_id / agent_id / operator name (the planner binds ids to it)")
    iss.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                     help="DNS name or IP clients dial (servers: workers, planner); repeatable")
    iss.add_argument("--out", default=None, metavar="DIR", help="where to write (default: --ca-dir)")
    iss.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    iss.set_defaults(func=cmd_issue)
    tok = csub.add_parser("token", help="create a bearer token: the token to --out, its hash line to --tokens-file")
    tok.add_argument("--role", required=True, choices=ROLES, help="the holder's role")
    tok.add_argument("--id", required=True, help="the holder's worker_id / agent_id / name")
    tok.add_argument("--out", required=True, metavar="FILE", help="file for the token itself (mode 0600; give it to the client)")
    tok.add_argument("--tokens-file", required=True, metavar="FILE",
                     help="server tokens file to append 'ROLE ID SHA256' to (--tokens-file of the daemons)")
    tok.set_defaults(func=cmd_token)
    rev = csub.add_parser("revoke", help="revoke certificates: add them to a CRL signed by the site CA (daemons' --crl-file)")
    rev.add_argument("certs", nargs="*", metavar="CERT.pem",
                     help="certificates to revoke (none: write an empty CRL, or re-sign the current one for --days more)")
    rev.add_argument("--ca-dir", required=True, metavar="DIR", help="directory holding ca.pem and ca.key")
    rev.add_argument("--crl", default=None, metavar="FILE", help="CRL to update or create (default: CA_DIR/crl.pem)")
    rev.add_argument("--days", type=int, default=30, help="the CRL's validity in days; publish a fresh one before (default: 30)")
    rev.set_defaults(func=cmd_revoke)


def cmd_ca(args: argparse.Namespace) -> int:
    from runtime.tools import pki

    cert, key = pki.write(pki.make_ca(args.name, args.days), args.out, "ca")
    print(f"site CA: {cert} (give to every daemon as --ca-file), {key} (keep it safe)")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    from runtime.tools import pki

    issued = pki.issue(pki.read(args.ca_dir, "ca"), args.role, args.id, tuple(args.host), args.days)
    cert, key = pki.write(issued, args.out or args.ca_dir, f"{args.role}-{args.id}")
    print(f"{args.role} {args.id}: --cert-file {cert} --key-file {key} --ca-file {os.path.join(args.ca_dir, 'ca.pem')}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from runtime.contracts.errors import InvalidInput
    from runtime.wire.security import token_digest

    if not args.id or any(c.isspace() or c == "#" for c in args.id):
        raise InvalidInput(f"--id must be one word without '#', got {args.id!r}")
    token = secrets.token_urlsafe(32)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    with open(args.tokens_file, "a") as f:
        f.write(f"{args.role} {args.id} {token_digest(token)}\n")
    print(f"{args.role} {args.id}: token in {args.out} (client --token-file), hash appended to {args.tokens_file}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from pathlib import Path

    from runtime.tools import pki

    crl = args.crl or os.path.join(args.ca_dir, "crl.pem")
    serials = pki.revoke(pki.read(args.ca_dir, "ca"), crl, [Path(c).read_bytes() for c in args.certs], args.days)
    print(f"{crl}: {len(serials)} revoked certificate(s), valid {args.days} days; daemons given --crl-file {crl} "
          "refuse them within a second")
    return 0
