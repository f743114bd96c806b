"""The database file deleted or replaced while the daemon serves it, and the next start."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from daemon import cachefile
from tests.conftest import Daemon, make_daemon, scan_body

KNOWN_KEY = "KEY-SHOPPER-5f1c2b"
# The daemon checks its database path once a second, and the drain and the copy take seconds.
EXIT_TIMEOUT = 30.0
# Exit code of `serve` when it stops on a StoreError.
STORE_ERROR_EXIT = 2


def _send(daemon: Daemon, body: dict[str, Any]) -> int | None:
    """Send one scan and return its HTTP status, or None when no connection could be made."""
    try:
        return daemon.post_json(body).status
    except OSError:
        return None


def _scan_until_exit(daemon: Daemon) -> dict[str, int | None]:
    """Send scans of the known key until the daemon exits, and return each scan id's status."""
    assert daemon.process is not None
    statuses: dict[str, int | None] = {}
    deadline = time.monotonic() + EXIT_TIMEOUT
    while daemon.process.poll() is None and time.monotonic() < deadline:
        body = scan_body(KNOWN_KEY)
        statuses[body["scanEvent"]["id"]] = _send(daemon, body)
        time.sleep(0.02)
    return statuses


def _wait_for_exit(daemon: Daemon) -> int:
    assert daemon.process is not None
    try:
        code = daemon.process.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the daemon still runs {EXIT_TIMEOUT} s after its database file changed")
    daemon.process = None
    return code


def _events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return [line for line in daemon.log_lines() if line["event"] == name]


def _stored_scan_ids(database: Path) -> tuple[set[str], set[str]]:
    """Return the scan ids of the decisions and of the outbox events in ``database``."""
    assert database.is_file(), f"no database at {database}"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        decided = {row[0] for row in connection.execute("SELECT scan_event_id FROM decisions")}
        bodies = connection.execute("SELECT body FROM outbox").fetchall()
    audited = {json.loads(body)["scanEventId"] for (body,) in bodies}
    return decided, audited


def _remove_database_only(database: Path) -> None:
    database.unlink()


def _remove_with_wal_and_shm(database: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink()


def _replace_with_empty_file(database: Path) -> None:
    # SQLite creates such a file when any connection opens the missing path.
    database.unlink()
    database.touch()


@pytest.mark.parametrize(
    "remove",
    [_remove_database_only, _remove_with_wal_and_shm, _replace_with_empty_file],
    ids=["database", "with-wal-and-shm", "empty-file"],
)
def test_deleted_database_restored(tmp_path: Path, remove: Any) -> None:
    daemon = make_daemon(tmp_path / "daemon")
    secret = daemon.directory / "connector.sqlite3.key"
    daemon.start()
    try:
        before = [scan_body(KNOWN_KEY) for _ in range(3)]
        for body in before:
            reply = daemon.post_json(body)
            assert reply.status == 200, reply.body
            assert reply.json()["action"] == "ACCEPT"
        secret_before = secret.read_bytes(), secret.stat().st_mtime_ns

        remove(daemon.database)
        after = _scan_until_exit(daemon)
        code = _wait_for_exit(daemon)
    finally:
        if daemon.process is not None:
            daemon.kill()

    assert code == STORE_ERROR_EXIT
    deleted = _events(daemon, "store.database_deleted")
    assert len(deleted) == 1
    assert deleted[0]["level"] == "error"
    assert deleted[0]["path"] == str(daemon.database)
    restored = _events(daemon, "store.database_restored")
    assert [line["path"] for line in restored] == [str(daemon.database)]
    # Requests after the stop began get 503 or find the listener closed, and none failed.
    assert set(after.values()) <= {200, 503, None}

    accepted = {body["scanEvent"]["id"] for body in before}
    accepted |= {scan_id for scan_id, status in after.items() if status == 200}
    decided, audited = _stored_scan_ids(daemon.database)
    assert accepted <= decided
    assert accepted <= audited
    assert (secret.read_bytes(), secret.stat().st_mtime_ns) == secret_before

    daemon.start()
    try:
        reply = daemon.scan(KNOWN_KEY)
        assert reply.status == 200, reply.body
        assert reply.json() == {"id": "shopper-1", "type": "SHOPPER", "action": "ACCEPT"}
        # A repeated scan gets the stored response, so the decisions survived.
        assert daemon.post_json(before[0]).status == 200
    finally:
        daemon.stop()
    assert _events(daemon, "store.migrated") == []
    assert _events(daemon, "store.orphan_cache_file_removed") == []
    assert _events(daemon, "store.cache_file_missing") == []


def test_replaced_database_saved_aside(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path / "daemon")
    replacement = daemon.directory / "replacement.sqlite3"
    with contextlib.closing(sqlite3.connect(replacement)) as connection:
        connection.execute("CREATE TABLE note (text TEXT)")
        connection.execute("INSERT INTO note VALUES ('put here by store IT')")
        connection.commit()
    replacement_bytes = replacement.read_bytes()
    daemon.start()
    try:
        before = [scan_body(KNOWN_KEY) for _ in range(3)]
        for body in before:
            assert daemon.post_json(body).status == 200

        os.replace(replacement, daemon.database)
        after = _scan_until_exit(daemon)
        code = _wait_for_exit(daemon)
    finally:
        if daemon.process is not None:
            daemon.kill()

    assert code == STORE_ERROR_EXIT
    replaced = _events(daemon, "store.database_replaced")
    assert [line["path"] for line in replaced] == [str(daemon.database)]
    assert replaced[0]["level"] == "error"
    assert _events(daemon, "store.database_restored") == []
    saved_aside = _events(daemon, "store.database_saved_aside")
    assert len(saved_aside) == 1
    saved = Path(saved_aside[0]["path"])
    assert saved.parent == daemon.directory
    assert saved.name.startswith("connector.sqlite3.deleted-")

    # The file now at the path is left byte for byte, without the old database's WAL file.
    assert daemon.database.read_bytes() == replacement_bytes
    assert not Path(f"{daemon.database}-wal").exists()
    accepted = {body["scanEvent"]["id"] for body in before}
    accepted |= {scan_id for scan_id, status in after.items() if status == 200}
    decided, audited = _stored_scan_ids(saved)
    assert accepted <= decided
    assert accepted <= audited


def test_new_database_warns_on_cache_removal(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path / "daemon")
    orphans = cachefile.cache_files(daemon.database)
    assert len(orphans) == 1
    for suffix in ("", "-wal", "-shm"):
        Path(f"{daemon.database}{suffix}").unlink(missing_ok=True)

    daemon.start()
    daemon.stop()

    warnings = _events(daemon, "store.orphan_cache_file_removed")
    assert [line["path"] for line in warnings] == [str(orphans[0])]
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["database"] == str(daemon.database)
    assert not orphans[0].exists()


def test_deleted_with_every_file_beside_it(tmp_path: Path) -> None:
    # rm connector.sqlite3* also deletes the secret and the cache file. Without the secret,
    # the restored database could not start: every restart would stop at the missing key.
    daemon = make_daemon(tmp_path / "daemon")
    secret = daemon.directory / "connector.sqlite3.key"
    daemon.start()
    try:
        before = scan_body(KNOWN_KEY)
        first = daemon.post_json(before)
        assert first.status == 200, first.body
        secret_bytes = secret.read_bytes()

        for path in daemon.directory.glob("connector.sqlite3*"):
            path.unlink()
        _scan_until_exit(daemon)
        code = _wait_for_exit(daemon)
    finally:
        if daemon.process is not None:
            daemon.kill()

    assert code == STORE_ERROR_EXIT
    assert [line["path"] for line in _events(daemon, "store.secret_restored")] == [str(secret)]
    assert secret.read_bytes() == secret_bytes
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600

    daemon.start()
    try:
        # The decision survived with its secret, so the repeat replays it byte for byte.
        repeat = daemon.post_json(before)
    finally:
        daemon.stop()
    assert repeat.status == 200
    assert repeat.body == first.body
