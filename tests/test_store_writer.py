"""The one writer: group commits, a failing job isolated, checkpoints off the commit path."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from daemon.store import CHECKPOINT_INTERVAL, Store


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
    keys = {row[0] for row in store.reader.connection.execute("SELECT key FROM meta")}

    assert results[0] == "a"
    assert isinstance(results[1], ValueError)
    assert results[2] == "b"
    assert keys == {"a", "b"}


def test_concurrent_jobs_all_commit(store: Store) -> None:
    async def scenario() -> list:
        return await asyncio.gather(*(store.writer.submit(_insert(f"k{i}")) for i in range(500)))

    results = asyncio.run(scenario())
    count = store.reader.connection.execute("SELECT count(*) FROM meta").fetchone()[0]
    assert len(results) == 500
    assert count == 500


def test_blocking_submit_from_thread(store: Store) -> None:
    assert store.writer.submit_and_wait(_insert("sync")) == "sync"
    with pytest.raises(ValueError, match="on purpose"):
        store.writer.submit_and_wait(_fail)


def test_wal_checkpointed_in_background(store: Store, tmp_path: Path) -> None:
    for index in range(200):
        store.writer.submit_and_wait(_insert(f"row{index}"))
    time.sleep(CHECKPOINT_INTERVAL * 2.5)
    # A copy of the main file alone, without its WAL, holds only checkpointed rows.
    copy = tmp_path / "main-file-only.sqlite3"
    copy.write_bytes(store.path.read_bytes())
    probe = sqlite3.connect(copy)
    try:
        count = probe.execute("SELECT count(*) FROM meta").fetchone()[0]
    finally:
        probe.close()
    assert count == 200
