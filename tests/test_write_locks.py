"""Write locks of the database and its cache file: a decision and an import beside each other.

Decisions write only the database, and `import` only the identity cache file, so neither
may wait for the other's write lock. Another connection holds one file's lock here, as a
long import batch or a long decision commit would.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from daemon import cachefile
from daemon.api import READY_PROBE_INTERVAL
from tests.conftest import Daemon, busy_timeout, edit_config, make_daemon, run_cli

# Long enough that a commit that waits for the held lock gives up within the test.
BUSY_TIMEOUT = "0.5s"
LOCK_RECORD = {
    "credentialId": "cred-lock-1",
    "key": "LOCK-TEST-0001",
    "id": "shopper-lock-1",
    "type": "SHOPPER",
    "status": "ACTIVE",
    "stores": ["STORE-001"],
    "version": 1,
}


def locked_daemon(tmp_path: Path) -> Daemon:
    daemon = make_daemon(tmp_path / "daemon")
    edit_config(daemon.config, busy_timeout(BUSY_TIMEOUT))
    return daemon


def cache_file_of(database: Path) -> Path:
    connection = sqlite3.connect(database)
    try:
        name = cachefile.pointer(connection)
    finally:
        connection.close()
    assert name is not None
    return database.with_name(name)


@contextlib.contextmanager
def write_lock(path: Path) -> Iterator[None]:
    """Hold the write lock of the SQLite file ``path`` from another connection."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def let_start_up_writes_finish(daemon: Daemon) -> None:
    """Wait until the start-up prune's two writer jobs, which take the cache file's lock
    too, have committed. Each /readyz probe queues behind the job before it, and a probe
    runs only 2 s after the last one."""
    for _ in range(2):
        assert daemon.request("GET", "/readyz").status == 200
        time.sleep(READY_PROBE_INTERVAL + 0.2)


def test_decision_beside_locked_cache_file(tmp_path: Path) -> None:
    daemon = locked_daemon(tmp_path)
    daemon.start()
    try:
        let_start_up_writes_finish(daemon)
        with write_lock(cache_file_of(daemon.database)):
            reply = daemon.scan("KEY-SHOPPER-5f1c2b")
        failures = [line for line in daemon.log_lines() if line["event"] == "store.commit_failed"]
    finally:
        daemon.stop()

    assert reply.status == 200
    assert reply.json()["action"] == "ACCEPT"
    assert failures == []


def test_import_beside_locked_database(tmp_path: Path) -> None:
    daemon = locked_daemon(tmp_path)
    records = tmp_path / "more.jsonl"
    records.write_text(json.dumps(LOCK_RECORD) + "\n", encoding="utf-8")

    with write_lock(daemon.database):
        result = run_cli("import", "--config", str(daemon.config), str(records))

    assert result.returncode == 0, result.stderr
    assert "1 inserted" in result.stdout


def test_import_beside_locked_cache_file(tmp_path: Path) -> None:
    daemon = locked_daemon(tmp_path)
    records = tmp_path / "more.jsonl"
    records.write_text(json.dumps(LOCK_RECORD) + "\n", encoding="utf-8")

    with write_lock(cache_file_of(daemon.database)):
        result = run_cli("import", "--config", str(daemon.config), str(records))

    assert result.returncode == 2
    assert "database is locked" in result.stderr
    assert "run the import again" in result.stderr
    assert "Traceback" not in result.stderr


def test_readiness_probe_beside_locked_cache_file(tmp_path: Path) -> None:
    # /readyz commits its probe when no decision or probe committed in the last 2 s. Like a
    # decision, the probe writes only the database, so it must not wait for an import's lock
    # on the cache file.
    daemon = locked_daemon(tmp_path)
    daemon.start()
    try:
        let_start_up_writes_finish(daemon)
        with write_lock(cache_file_of(daemon.database)):
            ready = daemon.request("GET", "/readyz")
            reply = daemon.scan("KEY-SHOPPER-5f1c2b")
        failures = [line for line in daemon.log_lines() if line["event"] == "store.commit_failed"]
    finally:
        daemon.stop()

    assert ready.status == 200
    assert reply.status == 200
    assert failures == []
