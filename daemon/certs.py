"""Validity dates of the certificates the daemon presents, for warnings and a metric.

A gateway that finds the listener's certificate expired, or an HQ that finds the client
certificate expired, rejects the TLS handshake. Both happen while the daemon runs, long after
the files were checked, so the dates are exported for an alert ahead of time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509


@dataclass(frozen=True, slots=True)
class Validity:
    """The validity period of a certificate, in UTC."""

    not_before: datetime
    not_after: datetime

    def problem(self, now: datetime) -> str | None:
        """Return "expired" or "not_yet_valid" at ``now``, or None inside the period."""
        if self.not_after < now:
            return "expired"
        if self.not_before > now:
            return "not_yet_valid"
        return None


@functools.lru_cache(maxsize=8)
def certificate_validity(pem: bytes) -> Validity | None:
    """Return the validity of the first certificate in ``pem``, or None when none loads.

    OpenSSL has already loaded the same bytes where this is called. None therefore means
    a form that OpenSSL accepts and cryptography does not read, and only the dates are lost.
    """
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return Validity(certificate.not_valid_before_utc, certificate.not_valid_after_utc)
