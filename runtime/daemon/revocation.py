"""Revoked client certificates: a CRL file (``--crl-file``, PEM or DER, signed by the site CA) checked
by the auth interceptor for every call that presents a certificate.

grpc checks a client certificate against the site CA during the handshake but knows nothing of
revocation; :class:`Revocations` reads the certificate grpc verified (the auth context's
``x509_pem_cert``), takes its serial number and looks it up in the CRL. The CRL is re-read when its
file changes or on SIGHUP (looked at once a second at most, runtime.wire.filewatch; a bad edit keeps
the previous list and is logged), and
must be signed by the CA of ``--ca-file`` (a CRL anyone could write would let anyone un-revoke).
``edgesplit certs revoke`` writes one (runtime.tools.pki.revoke).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections import OrderedDict

from cryptography import x509

from runtime.contracts.errors import InvalidInput
from runtime.wire.filewatch import FileWatch
from runtime.wire.security import MAX_PEM_BYTES

logger = logging.getLogger(__name__)

CRL_RECHECK_SECONDS = 1.0  # how often the CRL file's mtime is looked at
MAX_CRL_BYTES = 8 << 20  # largest CRL file read (about 200,000 revoked serials)
SERIAL_CACHE = 1024  # certificates whose serial is remembered (parsing one costs ~50 us)


def _read(path: str, limit: int, what: str) -> bytes:
    try:
        if os.path.getsize(path) > limit:
            raise InvalidInput(f"{what} {path} is larger than the {limit} bytes allowed")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise InvalidInput(f"{what} {path} cannot be read: {e.strerror or e}") from None


def load_crl(crl_file: str, ca_file: str) -> frozenset[int]:
    """The revoked serial numbers of ``crl_file``, after checking its signature against ``ca_file``'s CA."""
    data = _read(crl_file, MAX_CRL_BYTES, "CRL file")
    try:
        crl = x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_crl(data)
    except ValueError as e:
        raise InvalidInput(f"CRL file {crl_file} is not a PEM or DER CRL: {e}") from None
    ca = x509.load_pem_x509_certificate(_read(ca_file, MAX_PEM_BYTES, "CA file"))
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise InvalidInput(f"CRL file {crl_file} is not signed by the CA of {ca_file}; make it with "
                           "'edgesplit certs revoke' (or openssl ca -gencrl) using that CA's key")
    next_update = crl.next_update_utc
    if next_update is not None and next_update < datetime.datetime.now(datetime.timezone.utc):
        logger.warning("CRL file %s is past its next update (%s): publish a fresh one", crl_file, next_update)
    return frozenset(r.serial_number for r in crl)


class Revocations:
    """The revoked serials of one CRL file, reloaded when the file changes or on SIGHUP."""

    def __init__(self, crl_file: str, ca_file: str):
        if not ca_file:
            raise InvalidInput("--crl-file needs --ca-file: the CRL is checked against the site CA that signed it")
        self.crl_file, self.ca_file = crl_file, ca_file
        # at start a bad CRL stops the daemon; later a bad edit keeps the previous list
        self._watch = FileWatch((crl_file,), lambda: load_crl(crl_file, ca_file), "CRL", CRL_RECHECK_SECONDS)
        self._cache: OrderedDict[bytes, int] = OrderedDict()  # certificate PEM -> serial

    @property
    def serials(self) -> frozenset[int]:
        """The revoked serial numbers in force."""
        return self._watch.value

    def refresh(self) -> None:
        """Re-read the CRL if its file changed (looked at once a second at most)."""
        if self._watch.check():
            logger.info("CRL %s: %d revoked certificates", self.crl_file, len(self.serials))

    def serial(self, cert_pem: bytes) -> int:
        serial = self._cache.get(cert_pem)
        if serial is None:
            serial = x509.load_pem_x509_certificate(cert_pem).serial_number
            self._cache[cert_pem] = serial
            if len(self._cache) > SERIAL_CACHE:
                self._cache.popitem(last=False)
        return serial

    def revoked(self, cert_pem: bytes) -> int | None:
        """The certificate's serial if the CRL revokes it, else None."""
        self.refresh()
        serial = self.serial(cert_pem)
        return serial if serial in self.serials else None
