"""Snapshot lines in blocks: framing of HQ's stream, the worker process, and its fallback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import uvloop
from aiohttp import web
from structlog.testing import capture_logs

from daemon import cachefile, snapshot_worker
from daemon.hq import RebuildTakenOver, StoreAdapter
from daemon.normalize import normalize_key
from daemon.snapshot_worker import (
    Block,
    PreparedBlock,
    SnapshotWorker,
    WorkerFailed,
    prepare_block,
)
from daemon.store import KeyHasher, Store
from sync.client import MAX_SNAPSHOT_LINE_BYTES, SnapshotStream
from sync.errors import HqResponseInvalid
from sync.store import RebuildRestart
from tests.conftest import free_port

SECRET = b"s" * 32
KEY = "SECRET-KEY-0001"


def record(number: int, **fields: Any) -> dict[str, Any]:
    base = {
        "credentialId": f"c-{number}",
        "key": f"{KEY}-{number}",
        "id": f"person-{number}",
        "type": "SHOPPER",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "version": 1,
    }
    base.update(fields)
    return base


def line(data: object) -> bytes:
    return json.dumps(data).encode() + b"\n"


def prepare(*lines: bytes, first_line: int = 1) -> PreparedBlock:
    return prepare_block(Block(first_line, b"".join(lines), 1.0), KeyHasher(SECRET), 2)


def test_prepare_block_packs_valid_records() -> None:
    prepared = prepare(line(record(1)), line(record(2)), line(record(3)))
    assert prepared.error is None
    assert prepared.received == 3
    assert [size for _rows, _hashes, size in prepared.batches] == [2, 1]
    hashes = b"".join(key_hashes for _rows, key_hashes, _size in prepared.batches)
    expected = b"".join(KeyHasher(SECRET).hash(f"{KEY}-{n}") for n in (1, 2, 3))
    assert hashes == expected
    rows = [row for rows, _hashes, _size in prepared.batches for row in json.loads(rows)]
    assert [row[0] for row in rows] == ["c-1", "c-2", "c-3"]


def test_prepare_block_skips_blank_lines() -> None:
    prepared = prepare(b"\n", line(record(1)), b"   \n")
    assert (prepared.received, prepared.error) == (1, None)


def test_prepare_block_accepts_lax_values() -> None:
    prepared = prepare(line(record(1, version="7")))
    assert prepared.rejected == []
    assert json.loads(prepared.batches[0][0])[0][-1] == 7


@pytest.mark.parametrize(
    ("data", "reason_part"),
    [
        (record(1, type="shopper"), "type"),
        (record(1, stores=[]), "stores"),
        (record(1, key=" \t "), "key is empty"),
        (record(1, validFrom="2026-02-01T00:00:00Z", validUntil="2026-01-01T00:00:00Z"), "later"),
        ({k: v for k, v in record(1).items() if k != "id"}, "id"),
        (record(1, id="person\x001"), "id contains the character U+0000"),
        (record(1, stores=["STORE-001", "STORE\x00-002"]), "stores contains"),
    ],
    ids=["type-case", "no-stores", "blank-key", "window", "no-id", "nul-in-id", "nul-in-store"],
)
def test_prepare_block_rejects_invalid_record(data: dict[str, Any], reason_part: str) -> None:
    prepared = prepare(line(record(0)), line(data), first_line=41)
    assert prepared.error is None
    assert prepared.received == 2
    assert [(r.line, r.credential_id) for r in prepared.rejected] == [(42, "c-1")]
    assert reason_part in prepared.rejected[0].reason
    assert sum(size for _rows, _hashes, size in prepared.batches) == 1


def test_prepare_block_rejects_nul_in_credential_id() -> None:
    prepared = prepare(line(record(1, credentialId="c-1\x00b")))
    assert [(r.credential_id, r.reason) for r in prepared.rejected] == [
        ("c-1\x00b", "credentialId contains the character U+0000, which ids must not")
    ]


def test_prepare_block_keeps_long_credential_id_whole() -> None:
    # The digest compares whole ids, so the skipped record must keep all 300 characters.
    long_id = "c-" + "9" * 298
    prepared = prepare(line(record(1, credentialId=long_id)))
    assert [r.credential_id for r in prepared.rejected] == [long_id]


def test_prepare_block_reason_hides_key() -> None:
    prepared = prepare(line(record(1, type=f"{KEY}-1")))
    assert KEY not in prepared.rejected[0].reason


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b'{"credentialId": "broken", \n', "snapshot line 12 is not valid JSON"),
        (b"[1, 2]\n", "snapshot line 12 is not a JSON object"),
        (b"\xff\xfe\n", "snapshot line 12 is not valid JSON"),
        (
            b'{"pad": "' + b"x" * MAX_SNAPSHOT_LINE_BYTES + b'"}\n',
            f"snapshot line 12 is longer than {MAX_SNAPSHOT_LINE_BYTES} bytes",
        ),
    ],
)
def test_prepare_block_stops_at_broken_line(bad: bytes, message: str) -> None:
    prepared = prepare(line(record(1)), bad, line(record(2)), first_line=11)
    assert prepared.error == message
    assert prepared.received == 1


def run(coroutine: Awaitable[Any]) -> Any:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_worker_process_matches_function() -> None:
    lines = b"".join(line(record(n)) for n in range(5)) + b"not json\n"

    async def scenario() -> PreparedBlock:
        worker = await SnapshotWorker.start(SECRET, 2)
        try:
            return await worker.prepare(Block(100, lines, 5.0))
        finally:
            await worker.stop()

    from_process = run(scenario())
    in_process = prepare_block(Block(100, lines, 5.0), KeyHasher(SECRET), 2)
    assert msgspec.msgpack.encode(from_process) == msgspec.msgpack.encode(in_process)
    assert from_process.error == "snapshot line 105 is not valid JSON"


def test_worker_dead_process_raises() -> None:
    async def scenario() -> str:
        worker = await SnapshotWorker.start(SECRET, 2)
        worker.kill()
        try:
            await worker.prepare(Block(1, line(record(1)), 1.0))
        except WorkerFailed as exc:
            return str(exc)
        finally:
            await worker.stop()
        return "no error"

    assert "snapshot worker was killed by SIGKILL" in run(scenario())


def test_slow_worker_reply_logged_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot_worker, "SLOW_REPLY_SECONDS", 0.2)

    async def scenario() -> PreparedBlock:
        worker = await SnapshotWorker.start(SECRET, 2)
        pid = worker._process.pid
        try:
            os.kill(pid, signal.SIGSTOP)
            asyncio.get_running_loop().call_later(0.6, os.kill, pid, signal.SIGCONT)
            return await worker.prepare(Block(1, line(record(1)), 1.0))
        finally:
            os.kill(pid, signal.SIGCONT)
            await worker.stop()

    with capture_logs() as logs:
        prepared = run(scenario())
    slow = [entry for entry in logs if entry["event"] == "sync.worker_slow"]

    assert len(slow) == 1
    assert prepared.received == 1


async def stream_blocks(
    chunks: list[bytes], lines_per_block: int
) -> tuple[list[tuple[int, bytes]], str | None]:
    """Serve ``chunks`` as one streamed response on loopback and read it in blocks."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
            await asyncio.sleep(0.005)  # one read per chunk, so lines straddle reads
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/snapshot", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    blocks: list[tuple[int, bytes]] = []
    error = None
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/snapshot") as response,
        ):
            stream = SnapshotStream(response, "1.0", None)
            try:
                async for block in stream.blocks(lines_per_block):
                    blocks.append(block)
            except HqResponseInvalid as exc:
                error = str(exc)
    finally:
        await runner.cleanup()
    return blocks, error


def test_blocks_hold_whole_lines_numbered_across_reads() -> None:
    data = b"".join(b"line %d\n" % n for n in range(1, 11))
    chunks = [data[:13], data[13:14], data[14:40], data[40:]]
    blocks, error = run(stream_blocks(chunks, 3))
    assert error is None
    assert b"".join(block for _first, block in blocks) == data
    for first, block in blocks:
        assert block.endswith(b"\n")
        assert block.split(b"\n")[0] == b"line %d" % first


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([b"a\nb\nc"], "snapshot truncated: line 3 ends without a newline"),
        (
            [b"a\n", b"b" * (MAX_SNAPSHOT_LINE_BYTES + 1)],
            f"snapshot line 2 is longer than {MAX_SNAPSHOT_LINE_BYTES} bytes",
        ),
    ],
)
def test_broken_stream_is_reported_with_its_line(chunks: list[bytes], message: str) -> None:
    _blocks, error = run(stream_blocks(chunks, 1000))
    assert error == message


def test_count_check_names_both_counts() -> None:
    stream = SnapshotStream(None, "1.0", 3)  # type: ignore[arg-type]
    with pytest.raises(
        HqResponseInvalid, match="snapshot has 2 records, but its Identity-Count header announced 3"
    ):
        stream.check_count(2)
    stream.check_count(3)


def credential_of_key(store: Store, number: int) -> str | None:
    """Return the cached credential that the key of ``record(number)`` resolves to."""
    identity = store.reader.identity_by_hash(
        store.hasher.hash(normalize_key(f"{KEY}-{number}", None))
    )
    return None if identity is None else identity.credential_id


def test_rebuild_without_worker_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A system that refuses to start processes still gets its cache rebuilt."""

    async def fail_to_start(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", fail_to_start)
    store = Store.open(tmp_path / "cache.sqlite3", tmp_path / "cache.key")
    adapter = StoreAdapter(store)
    lines = b"".join(line(record(n)) for n in range(120)) + line(record(999, type="x"))

    async def scenario() -> int:
        await adapter.begin_rebuild()
        prepared = await adapter.prepare_lines(1, lines)
        await adapter.stage_records(prepared)
        assert (prepared.counts.put, prepared.counts.rejected) == (120, 1)
        return await adapter.finish_rebuild("1.0", 1.0)

    try:
        assert run(scenario()) == 120
        assert credential_of_key(store, 7) == "c-7"
    finally:
        adapter.close()
        store.close()
    assert "sync.worker_unavailable" in capsys.readouterr().out


def worker_pids() -> list[int]:
    """Process ids of this process's children that run the snapshot worker."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        for text in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{text}/cmdline").read_bytes()
            if b"daemon.snapshot_worker" in cmdline:
                pids.append(int(text))
    return pids


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_rebuild_restarts_without_worker_when_worker_dies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], event_loop: str
) -> None:
    """The worker wrote part of the new file when it died: the rebuild begins again, and
    stages in the daemon process."""
    store = Store.open(tmp_path / "cache.sqlite3", tmp_path / "cache.key")
    adapter = StoreAdapter(store)
    first = b"".join(line(record(n)) for n in range(50))
    second = b"".join(line(record(n)) for n in range(50, 100)) + line(record(999, type="x"))

    async def scenario() -> tuple[str, list[int], int]:
        await adapter.begin_rebuild()
        await adapter.stage_records(await adapter.prepare_lines(1, first))
        (pid,) = worker_pids()
        os.kill(pid, signal.SIGKILL)
        # The loop notices the exit before the next block is written, as with a slow HQ.
        await asyncio.sleep(0.5)
        try:
            await adapter.prepare_lines(51, second)
        except RebuildRestart as exc:
            error = str(exc)
        else:
            error = "no error"
        await adapter.abandon_rebuild()
        await adapter.begin_rebuild()
        await adapter.stage_records(await adapter.prepare_lines(1, first))
        prepared = await adapter.prepare_lines(51, second)
        assert (prepared.counts.put, prepared.counts.rejected) == (50, 1)
        await adapter.stage_records(prepared)
        workers = worker_pids()
        return error, workers, await adapter.finish_rebuild("1.0", 1.0)

    try:
        runner = uvloop.run if event_loop == "uvloop" else asyncio.run
        error, workers, count = runner(scenario())
        found = credential_of_key(store, 77)
    finally:
        adapter.close()
        store.close()
    assert "snapshot worker was killed by SIGKILL" in error
    assert workers == [], "the restarted rebuild started another worker"
    assert count == 100
    assert found == "c-77"
    assert "sync.worker_failed" in capsys.readouterr().out


def test_rebuild_after_worker_death_uses_worker(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "cache.sqlite3", tmp_path / "cache.key")
    adapter = StoreAdapter(store)
    lines = b"".join(line(record(n)) for n in range(20))

    async def rebuild() -> list[int]:
        await adapter.begin_rebuild()
        await adapter.stage_records(await adapter.prepare_lines(1, lines))
        workers = worker_pids()
        await adapter.finish_rebuild("1.0", 1.0)
        return workers

    async def scenario() -> tuple[list[int], list[int]]:
        await adapter.begin_rebuild()
        await adapter.prepare_lines(1, lines)
        (pid,) = worker_pids()
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.5)
        with pytest.raises(RebuildRestart):
            await adapter.prepare_lines(21, lines)
        await adapter.abandon_rebuild()
        return await rebuild(), await rebuild()

    try:
        restarted, next_one = run(scenario())
    finally:
        adapter.close()
        store.close()
    assert restarted == []
    assert len(next_one) == 1


def test_worker_writes_records_to_the_cache_file(tmp_path: Path) -> None:
    path = tmp_path / "new.cache"
    cachefile.build_connection(path).close()
    lines = b"".join(line(record(n)) for n in range(5)) + line(record(9, type="x"))

    async def scenario() -> PreparedBlock:
        worker = await SnapshotWorker.start(SECRET, 2, path)
        try:
            return await worker.prepare(Block(1, lines, 5.0))
        finally:
            await worker.stop()

    prepared = run(scenario())
    with contextlib.closing(sqlite3.connect(path)) as connection:
        rows = connection.execute(
            "SELECT credential_id, key_hash, updated_at FROM identities ORDER BY rowid"
        ).fetchall()
    hasher = KeyHasher(SECRET)
    expected = [(f"c-{n}", hasher.hash(normalize_key(f"{KEY}-{n}", None)), 5.0) for n in range(5)]
    assert (prepared.staged, prepared.batches, len(prepared.rejected)) == (5, [], 1)
    assert rows == expected


def test_worker_reports_a_write_it_could_not_make(tmp_path: Path) -> None:
    path = tmp_path / "new.cache"
    cachefile.build_connection(path).close()

    async def scenario() -> PreparedBlock:
        worker = await SnapshotWorker.start(SECRET, 2, path)
        try:
            with contextlib.closing(sqlite3.connect(path)) as connection:
                connection.execute("DROP TABLE identities")
                connection.commit()
            return await worker.prepare(Block(1, line(record(1)), 5.0))
        finally:
            await worker.stop()

    prepared = run(scenario())
    assert prepared.write_error is not None
    assert "identities" in prepared.write_error


def test_later_rebuild_stops_earlier_one(tmp_path: Path) -> None:
    """Two processes rebuilding one database: only the rebuild that began last swaps in."""
    first_store = Store.open(tmp_path / "cache.sqlite3", tmp_path / "cache.key")
    second_store = Store.open(tmp_path / "cache.sqlite3", tmp_path / "cache.key")
    first, second = StoreAdapter(first_store), StoreAdapter(second_store)
    lines = b"".join(line(record(n)) for n in range(40))

    async def scenario() -> tuple[str, int]:
        await first.begin_rebuild()
        await first.stage_records(await first.prepare_lines(1, lines))
        await second.begin_rebuild()
        await first.stage_records(await first.prepare_lines(41, lines))
        try:
            await first.finish_rebuild("1.0", 1.0)
        except RebuildTakenOver as exc:
            error = str(exc)
        else:
            error = "no error"
        await first.abandon_rebuild()
        await second.stage_records(await second.prepare_lines(1, lines))
        return error, await second.finish_rebuild("2.0", 2.0)

    try:
        error, count = run(scenario())
        files = cachefile.cache_files(second_store.path)
        in_use = second_store.cache.path
        cursor = second_store.reader.meta("cursor")
    finally:
        for adapter, store in ((first, first_store), (second, second_store)):
            adapter.close()
            store.close()
    assert "another process began rebuilding" in error
    assert count == 40
    assert cursor == "2.0"
    assert files == [in_use], "the stopped rebuild's file or the old cache file was left"


def test_worker_process_yields_the_cpu(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "cache.sqlite3", tmp_path / "cache.key")
    adapter = StoreAdapter(store)

    async def scenario() -> int:
        await adapter.begin_rebuild()
        await adapter.stage_records(await adapter.prepare_lines(1, line(record(1))))
        (pid,) = worker_pids()
        policy = os.sched_getscheduler(pid)
        await adapter.abandon_rebuild()
        return policy

    try:
        assert run(scenario()) == os.SCHED_IDLE
    finally:
        adapter.close()
        store.close()
