"""Revoked client certificates: a CRL file (``--crl-file``, PEM or DER, signed by the site CA) checked
by the auth interceptor for every call that presents a certificate.

grpc checks a client certificate against the site CA during the handshake but knows nothing of
revocation; :class:`Revocations` reads the certificate grpc verified (the auth context's
``x509_pem_cert``), takes its serial number and looks it up in the CRL. The CRL is re-read when its
file changes or on SIGHUP (looked at once a second at most, runtime.wire.filewatch; a bad edit keeps
the previous list and is logged), and must be signed by the CA of ``--ca-file`` (a CRL anyone could
write would let anyone un-revoke; runtime.wire.crl.load_crl, which clients use to check servers).
``edgesplit certs revoke`` writes one (runtime.tools.pki.revoke).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from cryptography import x509

from runtime.wire.crl import MAX_CRL_BYTES, crl_watch, load_crl
from runtime.wire.filewatch import RECHECK_SECONDS

logger = logging.getLogger(__name__)

CRL_RECHECK_SECONDS = RECHECK_SECONDS  # how often the CRL file's mtime is looked at
SERIAL_CACHE = 1024  # certificates whose serial is remembered (parsing one costs ~50 us)

__all__ = ["CRL_RECHECK_SECONDS", "MAX_CRL_BYTES", "Revocations", "load_crl"]


class Revocations:
    """The revoked serials of one CRL file, reloaded when the file changes or on SIGHUP."""

    def __init__(self, crl_file: str, ca_file: str):
        self.crl_file, self.ca_file = crl_file, ca_file
        self._watch = crl_watch(crl_file, ca_file)  # at start a bad CRL stops the daemon; later a bad edit keeps the list
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
