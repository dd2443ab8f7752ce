"""A small site PKI for a quick start: one site CA and per-role certificates (``edgesplit certs``).

Built on the ``cryptography`` package (nothing hand-rolled). Each leaf certificate names its
holder twice: the subject (CN = the id, OU = the role) and a SAN URI
``spiffe://edgesplit/ROLE/ID``, which is what the daemons read (runtime.daemon.auth). Server
certificates also carry the DNS names / IP addresses clients dial. Keys are ECDSA P-256, written
with mode 0600. The openssl equivalent is in README.md ("Security").
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from runtime.contracts.errors import InvalidInput
from runtime.wire.security import ROLES, spiffe_uri


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes  # the certificate
    key_pem: bytes  # its private key (PKCS#8, unencrypted: protect the file)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def make_ca(name: str = "edgesplit site CA", days: int = 3650) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def issue(ca: Issued, role: str, ident: str, hosts: tuple[str, ...] = (), days: int = 365,
          not_before: datetime.datetime | None = None) -> Issued:
    """A leaf certificate for ``ident`` in ``role``, signed by ``ca``; ``hosts`` (DNS names or IPs)
    make it usable as a server certificate too. ``not_before`` (tests) back-dates it."""
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not ident or "/" in ident:
        raise InvalidInput(f"id must be non-empty and without '/', got {ident!r}")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InvalidInput("the CA key is not an ECDSA key written by 'edgesplit certs ca'")
    key = _key()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_uri(role, ident))]
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    start = not_before or (_now() - datetime.timedelta(minutes=5))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ident),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def write(issued: Issued, directory: str | os.PathLike[str], stem: str) -> tuple[Path, Path]:
    """Write ``STEM.pem`` and ``STEM.key`` (mode 0600) into ``directory``; returns both paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / f"{stem}.pem", d / f"{stem}.key"
    cert.write_bytes(issued.cert_pem)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(issued.key_pem)
    return cert, key


def read(directory: str | os.PathLike[str], stem: str) -> Issued:
    d = Path(directory)
    return Issued((d / f"{stem}.pem").read_bytes(), (d / f"{stem}.key").read_bytes())


def make_crl(ca: Issued, serials: set[int] | frozenset[int], days: int = 30) -> bytes:
    """A CRL (PEM) signed by ``ca`` revoking ``serials``; valid ``days`` (publish a fresh one before)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InvalidInput("the CA key is not an ECDSA key written by 'edgesplit certs ca'")
    now = _now()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
               .next_update(now + datetime.timedelta(days=days)))
    for serial in sorted(serials):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def serial_of(cert_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(cert_pem).serial_number


def revoke(ca: Issued, crl_path: str | os.PathLike[str], cert_pems: list[bytes], days: int = 30) -> frozenset[int]:
    """Add the serials of ``cert_pems`` to the CRL at ``crl_path`` (made if absent), re-signed by ``ca``;
    the file is replaced atomically (daemons re-read it on change). Returns every revoked serial."""
    path = Path(crl_path)
    serials: set[int] = set()
    if path.exists():
        crl = x509.load_pem_x509_crl(path.read_bytes())
        if not crl.is_signature_valid(x509.load_pem_x509_certificate(ca.cert_pem).public_key()):  # type: ignore[arg-type]
            raise InvalidInput(f"{path} was not signed by this CA; give the CRL of the same site CA")
        serials = {r.serial_number for r in crl}
    serials |= {serial_of(p) for p in cert_pems}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(make_crl(ca, serials, days))
    os.replace(tmp, path)
    return frozenset(serials)
