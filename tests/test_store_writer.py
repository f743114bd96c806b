"""The one writer: group commits, a failing job isolated, checkpoints off the commit path."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from pathlib import Path

import pytest

from daemon import store as store_module
from daemon.store import CHECKPOINT_INTERVAL, Rows, Store


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    opened = Store.open(tmp_path / "db.sqlite3", tmp_path / "db.sqlite3.key")
    yield opened
    opened.close()


def _insert(value: str):  # type: ignore[no-untyped-def]
    def job(connection: sqlite3.Connection) -> str:
        connection.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (value, value))
        return value

    return job


def _fail(connection: sqlite3.Connection) -> None:
    connection.execute("INSERT INTO meta (key, value) VALUES ('doomed', 'x')")
    raise ValueError("job failed on purpose")


def test_failing_job_rolls_back_alone(store: Store) -> None:
    async def scenario() -> list:
        return await asyncio.gather(
            store.writer.submit(_insert("a")),
            store.writer.submit(_fail),
            store.writer.submit(_insert("b")),
            return_exceptions=True,
        )

    results = asyncio.run(scenario())
    keys = {
        row[0]
        for row in store.reader.connection.execute("SELECT key FROM meta WHERE key != 'cache_file'")
    }

    assert results[0] == "a"
    assert isinstance(results[1], ValueError)
    assert results[2] == "b"
    assert keys == {"a", "b"}


def test_concurrent_jobs_all_commit(store: Store) -> None:
    async def scenario() -> list:
        return await asyncio.gather(*(store.writer.submit(_insert(f"k{i}")) for i in range(500)))

    results = asyncio.run(scenario())
    count = store.reader.connection.execute(
        "SELECT count(*) FROM meta WHERE key != 'cache_file'"
    ).fetchone()[0]
    assert len(results) == 500
    assert count == 500


def test_blocking_submit_from_thread(store: Store) -> None:
    assert store.writer.submit_and_wait(_insert("sync")) == "sync"
    with pytest.raises(ValueError, match="on purpose"):
        store.writer.submit_and_wait(_fail)


@pytest.mark.parametrize(("mode", "pragma_value"), [("normal", 1), ("full", 2)])
def test_writer_uses_synchronous_mode(tmp_path: Path, mode: str, pragma_value: int) -> None:
    opened = Store.open(tmp_path / "db.sqlite3", tmp_path / "db.sqlite3.key", synchronous=mode)
    try:
        value = opened.writer.submit_and_wait(
            lambda connection: connection.execute("PRAGMA synchronous").fetchone()[0]
        )
    finally:
        opened.close()
    assert value == pragma_value


def test_wal_checkpointed_in_background(store: Store, tmp_path: Path) -> None:
    for index in range(200):
        store.writer.submit_and_wait(_insert(f"row{index}"))
    time.sleep(CHECKPOINT_INTERVAL * 2.5)
    # A copy of the main file alone, without its WAL, holds only checkpointed rows.
    copy = tmp_path / "main-file-only.sqlite3"
    copy.write_bytes(store.path.read_bytes())
    probe = sqlite3.connect(copy)
    try:
        count = probe.execute("SELECT count(*) FROM meta WHERE key != 'cache_file'").fetchone()[0]
    finally:
        probe.close()
    assert count == 200


def test_wal_starts_over_under_steady_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under writes that never pause, a checkpoint never catches up on its own, so the WAL
    # grows without end unless the writer resets it once it passes the limit.
    store = _open_small_wal_store(tmp_path, monkeypatch, frames=256, interval=0.1, rounds=2)
    wal = Path(str(store.path) + "-wal")
    blob = b"x" * 16384
    sizes: list[int] = []
    index = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            store.writer.submit_and_wait(_insert_blob(f"blob{index}", blob))
            store.reader.meta(f"blob{index}")
            index += 1
            if index % 20 == 0:
                sizes.append(wal.stat().st_size)
    finally:
        store.close()
    assert index * len(blob) > 32 * 1024 * 1024
    # Each start-over cuts the file back (journal_size_limit); without them it only grows.
    assert _count_cuts(sizes) >= 3


def test_bulk_jobs_wait_for_wal_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A snapshot rebuild queues bulk jobs back to back. Past the limit they wait until the
    # checkpoint thread has copied the whole WAL, so it starts over even with the writer's
    # own catch-up switched off, as here.
    store = _open_small_wal_store(tmp_path, monkeypatch, frames=256, interval=0.05, rounds=10**9)
    wal = Path(str(store.path) + "-wal")
    blob = b"x" * 16384
    sizes: list[int] = []

    async def scenario() -> int:
        queued: set[asyncio.Task] = set()
        index = 0
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            # Eight jobs in the queue at all times, so the writer never waits for one.
            while len(queued) < 8:
                job = _insert_blob(f"bulk{index}", blob)
                queued.add(asyncio.create_task(store.writer.submit(job, bulk=True)))
                index += 1
            done, _pending = await asyncio.wait(queued, return_when=asyncio.FIRST_COMPLETED)
            queued -= done
            sizes.append(wal.stat().st_size)
        await asyncio.gather(*queued)
        return index

    try:
        written = asyncio.run(scenario())
    finally:
        store.close()
    assert written * len(blob) > 32 * 1024 * 1024
    assert _count_cuts(sizes) >= 3


def test_bulk_jobs_not_stalled_by_old_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader inside a long transaction keeps the checkpoint from copying the whole WAL.
    # The hold before a start-over then cannot end on its own, and bulk jobs must go on.
    monkeypatch.setattr(store_module, "RESTART_RETRY_ROUNDS", 2)
    store = _open_small_wal_store(tmp_path, monkeypatch, frames=64, interval=0.05, rounds=5)
    reader = _reader_on_a_wal_snapshot(store)
    blob = b"x" * 16384

    async def scenario() -> None:
        for index in range(300):
            await store.writer.submit(_insert_blob(f"bulk{index}", blob), bulk=True)

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    finally:
        reader.execute("COMMIT")
        reader.close()
        store.close()


def _reader_on_a_wal_snapshot(store: Store) -> sqlite3.Connection:
    # A reader whose snapshot ends inside the WAL; one that began on a fully copied WAL reads
    # the database file alone and does not hold the checkpoint back.
    reader = sqlite3.connect(store.path, isolation_level=None)
    probe = sqlite3.connect(store.path, isolation_level=None)
    try:
        for attempt in range(50):
            store.writer.submit_and_wait(_insert(f"before{attempt}"))
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM meta WHERE key != 'cache_file'").fetchone()
            store.writer.submit_and_wait(_insert(f"after{attempt}"))
            _busy, frames, copied = probe.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if 0 <= copied < frames:
                return reader
            reader.execute("COMMIT")
    finally:
        probe.close()
    raise AssertionError("no reader snapshot inside the WAL after 50 attempts")


def _open_small_wal_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, frames: int, interval: float, rounds: int
) -> Store:
    """Open a store whose WAL starts over past ``frames`` pages, with short checkpoint rounds."""
    monkeypatch.setattr(store_module, "WAL_RESTART_FRAMES", frames)
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", interval)
    monkeypatch.setattr(store_module, "RESTART_CATCH_UP_ROUNDS", rounds)
    return Store.open(tmp_path / "db.sqlite3", tmp_path / "db.sqlite3.key")


def _count_cuts(sizes: list[int]) -> int:
    """Count the times the WAL file got shorter between two samples."""
    return sum(1 for before, after in itertools.pairwise(sizes) if after < before)


def _insert_blob(key: str, blob: bytes):  # type: ignore[no-untyped-def]
    def job(connection: sqlite3.Connection) -> None:
        connection.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, blob))

    return job


def test_rows_jobs_share_a_commit_and_fail_alone(store: Store) -> None:
    insert = "INSERT INTO meta (key, value) VALUES (?, ?)"

    async def scenario() -> list:
        return await asyncio.gather(
            store.writer.submit(Rows(((insert, ("r1", "a")),))),
            store.writer.submit(Rows(((insert, ("r1", "duplicate")),))),
            store.writer.submit(Rows(((insert, ("r2", "b")),))),
            return_exceptions=True,
        )

    results = asyncio.run(scenario())
    rows = dict(
        store.reader.connection.execute("SELECT key, value FROM meta WHERE key != 'cache_file'")
    )
    assert results[0] is None
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert rows == {"r1": "a", "r2": "b"}


def test_bulk_jobs_wait_for_regular_jobs(store: Store) -> None:
    order: list[str] = []

    def job(name: str, pause: float = 0.0):  # type: ignore[no-untyped-def]
        def run(connection: sqlite3.Connection) -> None:
            time.sleep(pause)
            order.append(name)

        return run

    async def scenario() -> None:
        # The first bulk job keeps the writer busy while the rest queue up behind it.
        first = asyncio.ensure_future(store.writer.submit(job("bulk-1", 0.3), bulk=True))
        await asyncio.sleep(0.1)
        await asyncio.gather(
            first,
            store.writer.submit(job("bulk-2"), bulk=True),
            store.writer.submit(job("bulk-3"), bulk=True),
            store.writer.submit(job("decision")),
        )

    asyncio.run(scenario())
    assert order == ["bulk-1", "decision", "bulk-2", "bulk-3"]
