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
