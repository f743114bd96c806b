"""The reconciliation digest both sides compute over their identity records."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def compute_digest(pairs: Iterable[tuple[str, int]]) -> tuple[int, str]:
    """Return the record count and the SHA-256 hex of ``credentialId:version\\n`` lines.

    ``pairs`` must already be sorted by credential id in byte order of its UTF-8 form,
    which is what SQLite's default BINARY collation gives for ``ORDER BY``.
    """
    sha = hashlib.sha256()
    count = 0
    for credential_id, version in pairs:
        sha.update(f"{credential_id}:{version}\n".encode())
        count += 1
    return count, sha.hexdigest()
