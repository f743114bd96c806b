"""A fake HQ serving a snapshot of synthetic identities from a file, for sync benchmarks.

``tests/fakehq.py`` keeps every record in memory. This subclass keeps its change log empty
and writes a snapshot of ``count`` synthetic identities to a file once, before the first
request, and sends that file with sendfile for each snapshot request. A real HQ runs on
other machines, so its work should not take CPU from the daemon under test. When this fake
HQ rendered the lines during each request, it used a large share of one of the two cores. The
records are the ones ``bench_resolve.py`` imports (same credential ids and keys), so
``resolve.lua`` resolves against them.
"""

from __future__ import annotations

import gzip
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakehq import FakeHq

LINES_PER_WRITE = 10_000


def snapshot_line(index: int) -> bytes:
    """Return record ``index`` as one NDJSON line (the shape bench_resolve.py imports)."""
    kind = "ASSOCIATE" if index % 50 == 0 else "SHOPPER"
    status = "ACTIVE" if index % 20 else "SUSPENDED"
    return (
        f'{{"credentialId":"bench-{index:08d}","key":"BENCH-KEY-{index:08d}",'
        f'"id":"person-{index // 2:08d}","type":"{kind}","status":"{status}",'
        f'"stores":["STORE-001"],"version":1}}\n'
    ).encode()


def snapshot_lines(count: int) -> Iterator[bytes]:
    for index in range(count):
        yield snapshot_line(index)


@dataclass
class SnapshotServed:
    """Timing of one snapshot response, as the fake HQ saw it (time.time() seconds)."""

    cursor: str
    started_at: float
    finished_at: float = 0.0
    lines: int = 0


@dataclass
class StreamingState:
    served: list[SnapshotServed] = field(default_factory=list)


class StreamingHq(FakeHq):
    """FakeHq serving a generated snapshot of ``count`` identities and its digest."""

    def __init__(
        self, count: int, folder: Path, store_id: str = "STORE-001", gzip: bool = False
    ) -> None:
        super().__init__(store_id)
        self.count = count
        self.gzip = gzip
        self.streaming = StreamingState()
        self._digest_hex = self._compute_digest(count)
        self.snapshot_file = self._write_snapshot(count, folder, gzip)

    @staticmethod
    def _write_snapshot(count: int, folder: Path, compressed: bool) -> Path:
        """Write the snapshot's lines to ``folder``; with ``compressed``, a .gz copy beside.

        aiohttp's FileResponse sends the .gz copy to a client that accepts gzip.
        """
        path = folder / "snapshot.ndjson"
        with path.open("wb") as plain:
            chunk: list[bytes] = []
            for line in snapshot_lines(count):
                chunk.append(line)
                if len(chunk) >= LINES_PER_WRITE:
                    plain.write(b"".join(chunk))
                    chunk = []
            plain.write(b"".join(chunk))
        packed = path.with_name(path.name + ".gz")
        packed.unlink(missing_ok=True)
        if compressed:
            with path.open("rb") as source, gzip.open(packed, "wb", compresslevel=6) as target:
                while block := source.read(1 << 20):
                    target.write(block)
        return path

    @staticmethod
    def _compute_digest(count: int) -> str:
        # Credential ids are zero-padded, so index order is byte order, as the digest needs.
        sha = hashlib.sha256()
        for index in range(count):
            sha.update(f"bench-{index:08d}:1\n".encode())
        return sha.hexdigest()

    async def _snapshot(self, request: web.Request) -> web.StreamResponse:
        cursor = self.cursor()
        served = SnapshotServed(cursor=cursor, started_at=time.time())
        self.streaming.served.append(served)
        return _SnapshotFileResponse(
            self,
            served,
            headers={
                "Content-Type": "application/x-ndjson",
                "Identity-Cursor": cursor,
                "Identity-Count": str(self.count),
                "Date": self._date(),
            },
        )

    async def _digest(self, request: web.Request) -> web.Response:
        return self._json(
            {"cursor": self.cursor(), "count": self.count, "digest": self._digest_hex}
        )

    async def _lookup(self, request: web.Request) -> web.Response:
        # Every benchmark key is in the snapshot, so only unknown keys reach HQ. Return 404
        # without scanning a record list, which this fake HQ does not keep.
        await request.read()
        return self._json({"title": "not found"}, status=404)


class _SnapshotFileResponse(web.FileResponse):
    """The snapshot file, noting when it has been sent (a slow reader paces the sending)."""

    def __init__(self, hq: StreamingHq, served: SnapshotServed, headers: dict[str, str]) -> None:
        super().__init__(hq.snapshot_file, headers=headers)
        self._hq = hq
        self._served = served

    async def prepare(self, request: web.BaseRequest) -> Any:
        writer = await super().prepare(request)
        self._served.lines = self._hq.count
        self._served.finished_at = time.time()
        self._hq.received.snapshot_lines_sent += self._hq.count
        return writer
