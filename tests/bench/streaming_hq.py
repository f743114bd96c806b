"""A fake HQ whose snapshot is generated line by line, for sync benchmarks of any size.

``tests/fakehq.py`` keeps every record in memory. This subclass keeps its change log empty
and serves a snapshot of ``count`` synthetic identities from a generator, so a snapshot of
millions of records costs the benchmark process no memory. The records are the ones
``bench_resolve.py`` imports (same credential ids and keys), so ``resolve.lua`` resolves
against them.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.web import ContentCoding

from tests.fakehq import FakeHq

LINES_PER_WRITE = 500


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

    def __init__(self, count: int, store_id: str = "STORE-001", gzip: bool = False) -> None:
        super().__init__(store_id)
        self.count = count
        self.gzip = gzip
        self.streaming = StreamingState()
        self._digest_hex = self._compute_digest(count)

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
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/x-ndjson",
                "Identity-Cursor": cursor,
                "Identity-Count": str(self.count),
                "Date": self._date(),
            }
        )
        if self.gzip:
            response.enable_compression(ContentCoding.gzip)
        await response.prepare(request)

        chunk: list[bytes] = []
        for line in snapshot_lines(self.count):
            chunk.append(line)
            if len(chunk) >= LINES_PER_WRITE:
                # write() waits for the transport to drain, so a slow reader paces the stream.
                await response.write(b"".join(chunk))
                served.lines += len(chunk)
                chunk = []
                # write() returns at once while the transport has room. Without this yield
                # the stream kept the loop for tens of ms, and online lookups waited behind
                # it. A real HQ serves them from other workers.
                await asyncio.sleep(0)
        await response.write(b"".join(chunk))
        served.lines += len(chunk)
        await response.write_eof()
        served.finished_at = time.time()
        self.received.snapshot_lines_sent += served.lines
        return response

    async def _digest(self, request: web.Request) -> web.Response:
        return self._json(
            {"cursor": self.cursor(), "count": self.count, "digest": self._digest_hex}
        )

    async def _lookup(self, request: web.Request) -> web.Response:
        # Every benchmark key is in the snapshot, so only unknown keys reach HQ. Return 404
        # without scanning a record list, which this fake HQ does not keep.
        await request.read()
        return self._json({"title": "not found"}, status=404)
