"""Snapshot lines validated, hashed and staged in a process of their own during a rebuild.

A rebuild decodes, validates and hashes every record of HQ's snapshot: about 15 us of
Python per record on the benchmark machine. Done in the daemon, that work shared the GIL
with the event loop, so decisions waited behind it. The worker is a child process
(``python -m daemon.snapshot_worker``) that reads blocks of complete lines on stdin. When
the daemon names the new cache file in its first frame, the worker writes each block's
records into that file itself and replies with the counts only. So the daemon streams bytes
in and no thread of it holds the GIL for the rebuild's rows: a builder thread that did
held it in short stretches, and under SCHED_IDLE the kernel could stop that thread in the
middle of one while the event loop waited for the GIL. Without a file, the worker replies
with the packed rows, for the daemon to write.

Frames in both directions are a 4-byte big-endian length and a msgpack body. The first
frame to the worker carries the HMAC secret, which is why it is sent on the pipe and never
on the command line. The worker lowers its own CPU priority where the system allows it, so
that the event loop wins the CPU when both want it. The worker never logs: rejected records
and stream errors come back in the reply, and the daemon logs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path
from typing import IO

import msgspec
import structlog

from daemon import cachefile
from daemon.identities import (
    RowBatch,
    credential_id_of,
    join_batches,
    loggable_reason,
    pack_records,
    stage_rows,
    version_of,
)
from daemon.normalize import normalize_key
from daemon.recordfile import (
    EMPTY_KEY_REASON,
    IdentityRecord,
    RecordInvalid,
    keyed_record_from_builtins,
)
from daemon.store import KeyHasher

log = structlog.get_logger(__name__)

# Kept equal to sync.client's limit, which the daemon applies to the bytes it carries over
# between blocks; the worker applies it to every whole line.
MAX_LINE_BYTES = 65536
# Raised niceness of the worker where SCHED_IDLE is refused: a busy event loop then gets
# about ten times its CPU share.
WORKER_NICENESS = 10
# A frame larger than this is a protocol error, not a block (blocks hold a few MiB).
MAX_FRAME_BYTES = 256 * 1024 * 1024
_HEADER_BYTES = 4
# Seconds to wait for a worker that stopped responding to exit, for its exit status.
REAP_TIMEOUT_SECONDS = 1.0
# A reply to one block that takes longer than this is logged once. A block of 2,000
# records takes tens of milliseconds on the benchmark machine.
SLOW_REPLY_SECONDS = 30.0


class Hello(msgspec.Struct, array_like=True):
    secret: bytes
    rows_per_batch: int
    cache_path: str | None = None
    """The cache file being built, made by ``cachefile.build_connection``; None to reply
    with the packed rows instead of writing them."""


class Block(msgspec.Struct, array_like=True):
    first_line: int
    """Line number of the block's first line in the snapshot stream (1-based)."""
    data: bytes
    """Complete lines, each ending with a newline."""
    updated_at: float


class Rejected(msgspec.Struct, array_like=True):
    line: int
    credential_id: str | None
    reason: str
    """The validation message with quoted values masked; never contains a key."""
    version: int | None = None
    """The record's version as HQ's digest counts it, when it is a usable number."""


class PreparedBlock(msgspec.Struct, array_like=True):
    batches: list[tuple[str, bytes, int]]
    """Packed rows in batches of the worker's rows_per_batch: rows JSON, key hashes, row count."""
    received: int
    """Lines that held a JSON object, valid or not (blank lines are not counted)."""
    rejected: list[Rejected]
    error: str | None = None
    """Reason the stream itself is broken (a line that is not a JSON object, or too long)."""
    staged: int = 0
    """Rows the worker wrote to the cache file itself; ``batches`` is then empty."""
    write_error: str | None = None
    """Reason the worker could not write the block to the cache file, such as a full disk."""

    def row_batches(self, updated_at: float) -> list[RowBatch]:
        return [RowBatch(rows, hashes, updated_at, size) for rows, hashes, size in self.batches]


class WorkerFailed(Exception):
    """The worker process exited or replied with something that is not a frame."""


_TYPED_DECODER = msgspec.json.Decoder(IdentityRecord)
_DECODER = msgspec.json.Decoder()


def prepare_block(block: Block, hasher: KeyHasher, rows_per_batch: int) -> PreparedBlock:
    """Validate, normalise and hash the records of ``block`` and pack them into batches.

    A record that breaks the identity schema is skipped and reported. A line that is not a
    JSON object, or is too long, ends the block with ``error`` set: the stream itself is
    then broken.
    """
    keyed: list[tuple[IdentityRecord, str]] = []
    rejected: list[Rejected] = []
    received = 0
    error = None
    number = block.first_line - 1
    for line in block.data.split(b"\n")[:-1]:
        number += 1
        if len(line) + 1 > MAX_LINE_BYTES:
            error = f"snapshot line {number} is longer than {MAX_LINE_BYTES} bytes"
            break
        try:
            # One pass decodes and validates a well-formed record; anything else takes the
            # slower path below, which gives the error its field or accepts lax values.
            record = _TYPED_DECODER.decode(line)
        except (msgspec.ValidationError, msgspec.DecodeError):
            record = None
        if record is not None:
            received += 1
            key = normalize_key(record.key, record.channels)
            if key:
                keyed.append((record, key))
                continue
            rejected.append(
                Rejected(
                    number,
                    record.credentialId,
                    EMPTY_KEY_REASON,
                    record.version,
                )
            )
            continue
        if not line.strip():
            continue
        try:
            data = _DECODER.decode(line)
        except msgspec.DecodeError:
            error = f"snapshot line {number} is not valid JSON"
            break
        if not isinstance(data, dict):
            error = f"snapshot line {number} is not a JSON object"
            break
        received += 1
        try:
            keyed.append(keyed_record_from_builtins(data))
        except RecordInvalid as exc:
            rejected.append(
                Rejected(number, credential_id_of(data), loggable_reason(exc), version_of(data))
            )
    batches = []
    for start in range(0, len(keyed), rows_per_batch):
        packed = pack_records(keyed[start : start + rows_per_batch], hasher, block.updated_at)
        batches.append((packed.rows, packed.key_hashes, packed.size))
    return PreparedBlock(batches=batches, received=received, rejected=rejected, error=error)


def merge_prepared(parts: list[PreparedBlock], rows_per_batch: int) -> PreparedBlock:
    """Join the results of consecutive blocks, regrouping their rows into larger batches."""
    batches: list[tuple[str, bytes, int]] = []
    group: list[RowBatch] = []
    for part in parts:
        for rows, hashes, size in part.batches:
            group.append(RowBatch(rows, hashes, 0.0, size))
            if sum(batch.size for batch in group) >= rows_per_batch:
                joined = join_batches(group)
                batches.append((joined.rows, joined.key_hashes, joined.size))
                group = []
    if group:
        joined = join_batches(group)
        batches.append((joined.rows, joined.key_hashes, joined.size))
    return PreparedBlock(
        batches=batches,
        received=sum(part.received for part in parts),
        rejected=[rejected for part in parts for rejected in part.rejected],
        error=next((part.error for part in parts if part.error is not None), None),
    )


def _read_frame(stream: IO[bytes]) -> bytes | None:
    header = stream.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES:
        return None
    size = int.from_bytes(header, "big")
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(_HEADER_BYTES, "big") + body


def yield_cpu() -> None:
    """Let the calling thread run only while no other thread wants the CPU.

    A rebuild's worker and builder thread use SCHED_IDLE, so a decision's threads take the CPU
    from them at once. Where that policy is refused, the thread sets its niceness to
    WORKER_NICENESS instead. Where a seccomp filter refuses both, it keeps its priority.
    """
    try:
        # Linux applies both calls to the calling thread only.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)


def worker_main() -> int:
    """Serve blocks from stdin until it closes."""
    yield_cpu()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    first = _read_frame(stdin)
    if first is None:
        return 0
    hello = msgspec.msgpack.decode(first, type=Hello)
    hasher = KeyHasher(hello.secret)
    block_decoder = msgspec.msgpack.Decoder(Block)
    encoder = msgspec.msgpack.Encoder()
    connection = None
    if hello.cache_path is not None:
        connection = cachefile.stage_connection(Path(hello.cache_path))
    try:
        while (frame := _read_frame(stdin)) is not None:
            block = block_decoder.decode(frame)
            result = prepare_block(block, hasher, hello.rows_per_batch)
            if connection is not None:
                result = stage_block(connection, result, block.updated_at)
            stdout.write(_frame(encoder.encode(result)))
            stdout.flush()
    finally:
        if connection is not None:
            connection.close()
    return 0


def stage_block(
    connection: sqlite3.Connection, prepared: PreparedBlock, updated_at: float
) -> PreparedBlock:
    """Write a prepared block's rows in one transaction; return it with the rows counted.

    A block whose stream broke is not written: the rebuild fails on it anyway.
    """
    if prepared.error is not None or not prepared.batches:
        return msgspec.structs.replace(prepared, batches=[])
    batch = join_batches(prepared.row_batches(updated_at))
    try:
        stage_rows(connection, batch)
    except sqlite3.Error as exc:
        return msgspec.structs.replace(prepared, batches=[], write_error=str(exc))
    return msgspec.structs.replace(prepared, batches=[], staged=batch.size)


class SnapshotWorker:
    """The daemon's handle on one worker process, started for one rebuild."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._lock = asyncio.Lock()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(PreparedBlock)

    @classmethod
    async def start(
        cls, secret: bytes, rows_per_batch: int, cache_path: Path | None = None
    ) -> SnapshotWorker:
        """Start a worker; raise OSError when the process cannot be started.

        With ``cache_path``, the worker writes the records into that file itself.
        """
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon.snapshot_worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(process)
        assert process.stdin is not None
        path = None if cache_path is None else str(cache_path)
        process.stdin.write(_frame(worker._encoder.encode(Hello(secret, rows_per_batch, path))))
        return worker

    async def prepare(self, block: Block) -> PreparedBlock:
        """Send one block and return its prepared rows; raise WorkerFailed if the worker died."""
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        async with self._lock:
            try:
                process.stdin.write(_frame(self._encoder.encode(block)))
                await process.stdin.drain()
                header = await self._read_header(process.stdout, block.first_line)
                size = int.from_bytes(header, "big")
                if size > MAX_FRAME_BYTES:
                    raise WorkerFailed(f"snapshot worker sent a {size}-byte frame")
                body = await process.stdout.readexactly(size)
            except (asyncio.IncompleteReadError, ConnectionError, RuntimeError):
                # uvloop raises RuntimeError for a write to the pipe of a worker that has
                # exited, asyncio a ConnectionError.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), REAP_TIMEOUT_SECONDS)
                raise WorkerFailed(_exit_description(process.returncode)) from None
            try:
                return self._decoder.decode(body)
            except msgspec.DecodeError as exc:
                raise WorkerFailed(f"snapshot worker sent an unreadable reply: {exc}") from None

    async def _read_header(self, stdout: asyncio.StreamReader, first_line: int) -> bytes:
        """Read a reply's length, logging once when the worker takes unusually long.

        The worker runs at idle priority, so on a busy box a reply may take long, and it is
        waited for. A worker that is stopped (SIGSTOP) or stuck would otherwise halt the
        sync without a line in the log.
        """
        reading = asyncio.ensure_future(stdout.readexactly(_HEADER_BYTES))
        try:
            done, _pending = await asyncio.wait({reading}, timeout=SLOW_REPLY_SECONDS)
        except asyncio.CancelledError:
            reading.cancel()
            raise
        if not done:
            log.warning(
                "sync.worker_slow",
                pid=self._process.pid,
                first_line=first_line,
                waited_seconds=SLOW_REPLY_SECONDS,
                detail="the snapshot worker has not answered a block; the rebuild and the"
                " sync wait for it. A busy box slows it (it runs at idle priority); a"
                " stopped or stuck process needs a look",
            )
        return await reading

    def kill(self) -> None:
        """Stop the worker at once, without waiting for it, for a daemon that is stopping."""
        if self._process.returncode is None:
            self._process.kill()

    async def stop(self) -> None:
        """Stop the worker and reap it.

        It is killed, not asked: it commits each block before it replies, so between blocks
        it has nothing to lose, and a worker stopped halfway through a block writes to a
        file that the caller then deletes.
        """
        self.kill()
        await self._process.wait()


def _exit_description(status: int | None) -> str:
    """Describe how the worker ended, from its exit status (negative: the signal)."""
    if status is None:
        return "snapshot worker closed its pipes but is still running"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"snapshot worker was killed by {name}"
    if status == 0:
        return "snapshot worker exited before it answered a block"
    return (
        f"snapshot worker exited with status {status}; its traceback, if any, is in the"
        " daemon's standard error just before this line"
    )


if __name__ == "__main__":
    sys.exit(worker_main())
