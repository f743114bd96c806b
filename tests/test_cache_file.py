"""The identity cache in a file of its own: a rebuild builds a new file and switches to it.

Each test opens real stores on real files in a temporary folder and runs the store
adapter's rebuild steps as the sync does, without HQ: the snapshot lines come from the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from daemon import cachefile
from daemon.hq import StoreAdapter
from daemon.store import Store

REBUILT = 30


def snapshot_lines(count: int, prefix: str) -> bytes:
    return b"".join(
        json.dumps(
            {
                "credentialId": f"{prefix}-{number}",
                "key": f"KEY-{prefix.upper()}-{number}",
                "id": f"person-{prefix}-{number}",
                "type": "SHOPPER",
                "status": "ACTIVE",
                "stores": ["STORE-001"],
                "version": 1,
            }
        ).encode()
        + b"\n"
        for number in range(count)
    )


def open_store(directory: Path) -> Store:
    return Store.open(directory / "connector.sqlite3", directory / "connector.sqlite3.key")


async def rebuild(adapter: StoreAdapter, lines: bytes, cursor: str) -> int:
    await adapter.begin_rebuild()
    await adapter.stage_records(await adapter.prepare_lines(1, lines))
    return await adapter.finish_rebuild(cursor, 1.0)


def credentials(store: Store) -> set[str]:
    rows = store.reader.connection.execute("SELECT credential_id FROM identities")
    return {row[0] for row in rows}


def files_of(path: Path) -> list[Path]:
    return [Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm")]


def test_rebuild_moves_every_connection_to_the_new_file(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    adapter = StoreAdapter(store)
    old = store.cache.path
    try:
        count = asyncio.run(rebuild(adapter, snapshot_lines(REBUILT, "new"), "5.1"))
        new = store.cache.path
        attached_everywhere = store.attached_everywhere(new)
        seen = credentials(store)
        cursor = store.reader.meta("cursor")
        written = store.writer.submit_and_wait(
            lambda connection: connection.execute(
                "SELECT file FROM pragma_database_list WHERE name = 'cache'"
            ).fetchone()[0]
        )
    finally:
        adapter.close()
        store.close()

    assert count == REBUILT
    assert new != old
    assert attached_everywhere, "a connection still has the old cache file attached"
    assert seen == {f"new-{number}" for number in range(REBUILT)}
    assert cursor == "5.1"
    assert Path(written) == new
    assert [path for path in files_of(old) if path.exists()] == [], "old cache file left"
    assert cachefile.cache_files(tmp_path / "connector.sqlite3") == [new]


def test_name_of_the_new_file_survives_a_restart(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    adapter = StoreAdapter(store)
    try:
        asyncio.run(rebuild(adapter, snapshot_lines(REBUILT, "kept"), "6.0"))
        new = store.cache.path
    finally:
        adapter.close()
        store.close()

    reopened = open_store(tmp_path)
    try:
        assert reopened.cache.path == new
        assert len(credentials(reopened)) == REBUILT
        assert reopened.reader.meta("cursor") == "6.0"
    finally:
        reopened.close()


@contextlib.contextmanager
def write_locks_held(database: Path, cache: Path) -> Any:
    """Hold the write lock of the database and of the cache file in use, from another thread."""
    locked = threading.Event()
    release = threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(database, isolation_level=None)
        try:
            connection.execute("ATTACH DATABASE ? AS cache", (str(cache),))
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO meta (key, value) VALUES ('lock', 'held')")
            connection.execute("INSERT INTO cache.cache_meta (key, value) VALUES ('lock', 'held')")
            locked.set()
            release.wait(30)
            connection.execute("ROLLBACK")
        finally:
            connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert locked.wait(10), "the lock holder did not start"
    try:
        yield
    finally:
        release.set()
        thread.join()


def test_staging_needs_neither_write_lock_of_the_store(tmp_path: Path) -> None:
    # Decisions commit under the database's lock, pulls under the cache file's. Staging a
    # snapshot writes only the new file, so it goes on while another connection has both.
    store = open_store(tmp_path)
    adapter = StoreAdapter(store)

    async def scenario() -> int:
        await adapter.begin_rebuild()
        prepared = await adapter.prepare_lines(1, snapshot_lines(REBUILT, "staged"))
        with write_locks_held(store.path, store.cache.path):
            # The store's busy timeout is 5 s: a write that needed either lock would wait
            # that long and fail; this bound is shorter.
            await asyncio.wait_for(adapter.stage_records(prepared), 2.5)
        return await adapter.finish_rebuild("7.0", 1.0)

    try:
        assert asyncio.run(scenario()) == REBUILT
    finally:
        adapter.close()
        store.close()


def test_abandoned_rebuild_deletes_its_file(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    adapter = StoreAdapter(store)
    in_use = store.cache.path

    async def scenario() -> None:
        await adapter.begin_rebuild()
        await adapter.stage_records(await adapter.prepare_lines(1, snapshot_lines(5, "gone")))
        await adapter.abandon_rebuild()

    try:
        asyncio.run(scenario())
        assert store.cache.path == in_use
        assert credentials(store) == set()
    finally:
        adapter.close()
        store.close()
    assert cachefile.cache_files(tmp_path / "connector.sqlite3") == [in_use]


def test_adopt_follows_another_process_and_removes_leftovers(tmp_path: Path) -> None:
    # A daemon that waited for the sync lock while sync --now rebuilt the cache: once it
    # holds the lock it must use the new file, and files of interrupted rebuilds go.
    waiting = open_store(tmp_path)
    syncing = open_store(tmp_path)
    leftover = tmp_path / "connector.sqlite3.cache-0123456789ab"
    cachefile.create_empty(leftover)
    Path(f"{leftover}-wal").write_bytes(b"")
    first, second = StoreAdapter(waiting), StoreAdapter(syncing)
    try:
        asyncio.run(rebuild(second, snapshot_lines(REBUILT, "other"), "8.0"))
        new = syncing.cache.path
        asyncio.run(first.adopt_cache_file())
        adopted = waiting.cache.path
        seen = credentials(waiting)
        cursor = waiting.reader.meta("cursor")
    finally:
        for adapter, store in ((first, waiting), (second, syncing)):
            adapter.close()
            store.close()

    assert adopted == new
    assert seen == {f"other-{number}" for number in range(REBUILT)}
    assert cursor == "8.0"
    assert [path for path in files_of(leftover) if path.exists()] == [], "leftover not removed"
    assert cachefile.cache_files(tmp_path / "connector.sqlite3") == [new]


def test_builder_thread_yields_the_cpu(tmp_path: Path) -> None:
    # A rebuild's inserts and index must not take the CPU from decisions.
    store = open_store(tmp_path)
    adapter = StoreAdapter(store)

    async def builder_policy() -> int:
        return await adapter._build(os.sched_getscheduler, 0)

    try:
        policy = asyncio.run(builder_policy())
    finally:
        adapter.close()
        store.close()
    assert policy == os.SCHED_IDLE
