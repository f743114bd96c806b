"""kill -9 in the middle of a batch apply or a snapshot rebuild: cursor and data agree.

Also store faults under the sync loops: a disk too small for a rebuild, a locked database.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import cachefile
from tests.conftest import (
    SAMPLE_RECORDS,
    Daemon,
    busy_timeout,
    edit_config,
    labelled_samples,
    make_daemon,
)
from tests.fakehq import (
    FakeHq,
    hq_config,
    local_versions,
    log_events,
    make_records,
    meta,
    versions_of,
    wait_until,
)

BULK = 30000
# Snapshot records that fail validation (their type is unknown); they sort before the bulk
# records, so they are in the snapshot's first block.
INVALID_RECORDS = [
    {
        "credentialId": f"a-invalid-{number}",
        "key": f"KEY-INVALID-{number}-5e",
        "id": f"invalid-{number}",
        "type": "NOBODY",
        "status": "ACTIVE",
        "stores": ["STORE-001"],
        "version": 1,
    }
    for number in range(2)
]


@pytest.fixture
def hq() -> Iterator[FakeHq]:
    server = FakeHq().start()
    yield server
    server.close()


def new_daemon(tmp_path: Path, hq: FakeHq, extra: str, records: list) -> Daemon:
    directory = tmp_path / "daemon"
    return make_daemon(directory, hq_config(hq, directory, extra), records=records)


def cache_file_count(daemon: Daemon) -> int:
    return len(cachefile.cache_files(daemon.database))


def test_kill_during_batch_apply(tmp_path: Path, hq: FakeHq) -> None:
    daemon = new_daemon(tmp_path, hq, "pull_batch_size = 1000", records=[])
    daemon.start()
    wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="empty snapshot")

    hq.put(*make_records(BULK))
    wait_until(lambda: hq.received.requests["changes"] >= 8, what="several pages pulled")
    daemon.stop(signal.SIGKILL)

    cursor = meta(daemon.database, "cursor")
    assert cursor is not None
    assert cursor != hq.cursor(), "the kill came after the last page; raise BULK"
    assert local_versions(daemon.database) == versions_of(hq.state_at(cursor))

    daemon.start()
    try:
        wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="catch-up")
        assert local_versions(daemon.database) == versions_of(hq.records)
    finally:
        daemon.stop()


def test_kill_during_snapshot_rebuild(tmp_path: Path, hq: FakeHq) -> None:
    hq.put(*make_records(BULK))
    hq.control.snapshot_line_delay = 0.05
    daemon = new_daemon(tmp_path, hq, "snapshot_batch_size = 1000", records=SAMPLE_RECORDS)
    daemon.start()
    wait_until(lambda: hq.received.snapshot_lines_sent >= 8000, what="part of the snapshot")
    daemon.stop(signal.SIGKILL)

    assert cache_file_count(daemon) == 2, "no half-built cache file beside the one in use"
    assert meta(daemon.database, "cursor") is None
    assert local_versions(daemon.database) == versions_of(
        {r["credentialId"]: r for r in SAMPLE_RECORDS}
    )

    hq.control.snapshot_line_delay = 0.0
    daemon.start()
    try:
        wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="the rebuild")
        assert local_versions(daemon.database) == versions_of(hq.records)
        # The old file goes once every connection has moved to the new one.
        wait_until(lambda: cache_file_count(daemon) == 1, what="one cache file", timeout=10)
    finally:
        daemon.stop()


def snapshot_worker_pids(daemon: Daemon) -> list[int]:
    """Process ids of the daemon's snapshot worker processes."""
    assert daemon.process is not None
    pids = []
    for task in Path(f"/proc/{daemon.process.pid}/task").iterdir():
        for text in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError):
                if b"daemon.snapshot_worker" in Path(f"/proc/{text}/cmdline").read_bytes():
                    pids.append(int(text))
    return pids


def test_worker_killed_during_rebuild(tmp_path: Path, hq: FakeHq) -> None:
    """The worker that writes the new cache file dies: the daemon downloads the snapshot
    again, rebuilds without a worker, loses no record, and logs each invalid record once."""
    hq.put(*INVALID_RECORDS, *make_records(BULK))
    valid = {c: r for c, r in hq.records.items() if not c.startswith("a-invalid-")}
    hq.control.snapshot_line_delay = 0.05
    daemon = new_daemon(tmp_path, hq, "snapshot_batch_size = 1000", records=[])
    daemon.start()
    try:
        wait_until(lambda: hq.received.snapshot_lines_sent >= 8000, what="part of the snapshot")
        wait_until(
            lambda: len(log_events(daemon, "sync.record_rejected")) == len(INVALID_RECORDS),
            what="the invalid records of the first download",
        )
        (pid,) = wait_until(lambda: snapshot_worker_pids(daemon), what="the worker")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: log_events(daemon, "sync.rebuilt"), what="the rebuild")
        assert meta(daemon.database, "cursor") == hq.cursor()
        assert local_versions(daemon.database) == versions_of(valid)
        assert hq.received.requests["snapshot"] == 2
        assert len(log_events(daemon, "sync.worker_failed")) == 1
        assert log_events(daemon, "sync.pull_crashed") == []
    finally:
        daemon.stop()

    rejected = [line["credential_id"] for line in log_events(daemon, "sync.record_rejected")]
    assert rejected == ["a-invalid-0", "a-invalid-1"]
    (rebuilt,) = log_events(daemon, "sync.rebuilt")
    assert rebuilt["rejected"] == len(INVALID_RECORDS)


def limit_file_size(pid: int, max_bytes: int) -> None:
    """Let process ``pid``, and the processes it starts from now on, write no file past
    ``max_bytes``. A write past it fails with EFBIG, as a write to a full disk fails."""
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (max_bytes, hard))


def assert_logged_once_then_counted(crashes: list[dict[str, Any]], error: str) -> None:
    """Check the crash lines of one loop: a traceback first, then one-line repeats."""
    first, *repeats = crashes
    assert error in first["error"]
    assert first["level"] == "error"
    assert "Traceback" in first["exception"]
    assert len(repeats) >= 2
    assert [line["error"] for line in repeats] == [first["error"]] * len(repeats)
    assert [line["level"] for line in repeats] == ["warning"] * len(repeats)
    assert [line.get("exception") for line in repeats] == [None] * len(repeats)
    assert [line["repeats"] for line in repeats] == list(range(1, len(repeats) + 1))


def test_rebuild_on_full_disk_logs_traceback_once(tmp_path: Path, hq: FakeHq) -> None:
    hq.put(*SAMPLE_RECORDS)
    daemon = new_daemon(tmp_path, hq, "", records=[])
    daemon.start()
    try:
        wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="the snapshot")
        assert daemon.process is not None
        pid = daemon.process.pid
        # The new cache file of 10000 records outgrows 512 KiB, and the files the daemon
        # has written so far (database, cache file, log) are smaller.
        limit_file_size(pid, 512 * 1024)
        hq.put(*make_records(10000))
        hq.expire_cursors()
        wait_until(
            lambda: len(log_events(daemon, "sync.pull_crashed")) >= 4, what="four failed rebuilds"
        )
        limit_file_size(pid, resource.RLIM_INFINITY)
        wait_until(lambda: log_events(daemon, "sync.pull_recovered"), what="the rebuild")
        assert meta(daemon.database, "cursor") == hq.cursor()
    finally:
        daemon.stop()

    crashes = log_events(daemon, "sync.pull_crashed")
    assert_logged_once_then_counted(crashes, "the snapshot worker could not write")
    (recovered,) = log_events(daemon, "sync.pull_recovered")
    assert recovered["previous_error"] == crashes[0]["error"]
    assert recovered["failed_attempts"] == len(crashes)


def test_locked_database_logs_traceback_once(tmp_path: Path, hq: FakeHq) -> None:
    hq.put(*SAMPLE_RECORDS)
    daemon = new_daemon(tmp_path, hq, "", records=[])
    # Every commit of the daemon fails after 0.2 s while the test holds the write lock.
    edit_config(daemon.config, busy_timeout("0.2s"))
    daemon.start()
    holder = sqlite3.connect(daemon.database, isolation_level=None, timeout=5)
    try:
        wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="the snapshot")
        holder.execute("BEGIN IMMEDIATE")
        wait_until(
            lambda: (
                len(log_events(daemon, "sync.pull_crashed")) >= 3
                and len(log_events(daemon, "sync.upload_crashed")) >= 3
                and len(log_events(daemon, "sync.state_not_saved")) >= 3
            ),
            what="three failed pulls, uploads and state saves",
        )
        holder.execute("ROLLBACK")
        wait_until(
            lambda: (
                log_events(daemon, "sync.pull_recovered")
                and log_events(daemon, "sync.upload_recovered")
                and log_events(daemon, "sync.state_saved")
            ),
            what="both loops and the state save to succeed again",
        )
    finally:
        holder.close()
        daemon.stop()

    for loop in ("pull", "upload"):
        crashes = log_events(daemon, f"sync.{loop}_crashed")
        assert_logged_once_then_counted(crashes, "database is locked")
        (recovered,) = log_events(daemon, f"sync.{loop}_recovered")
        assert recovered["level"] == "info"
        assert recovered["failed_attempts"] == len(crashes)
    assert_logged_once_then_counted(log_events(daemon, "sync.state_not_saved"), "locked")
    (saved,) = log_events(daemon, "sync.state_saved")
    assert saved["level"] == "info"


def hq_state_metric(daemon: Daemon) -> str:
    """Return the HQ state that /metrics reports: the sync's state, not the one announced."""
    states = labelled_samples(daemon, "identity_connector_hq_state", "state")
    (state,) = [state for state, value in states.items() if value == 1.0]
    return state


def test_upload_crash_not_recovered_while_idle(tmp_path: Path, hq: FakeHq) -> None:
    hq.put(*SAMPLE_RECORDS)
    # The trim runs once at start only, so a round while HQ is offline attempts nothing.
    daemon = new_daemon(tmp_path, hq, "", records=[])
    edit_config(
        daemon.config,
        ('outbox_trim_interval = "200ms"', 'outbox_trim_interval = "1h"'),
        busy_timeout("0.2s"),
    )
    daemon.start()
    holder = sqlite3.connect(daemon.database, isolation_level=None, timeout=5)
    try:
        wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="the snapshot")
        hq.down()
        wait_until(lambda: hq_state_metric(daemon) == "offline", what="HQ offline")
        assert daemon.scan("KEY-ASSOCIATE-8e2d11").status == 200
        # HQ accepts the event, and deleting it from the locked outbox fails.
        holder.execute("BEGIN IMMEDIATE")
        hq.up()
        wait_until(lambda: log_events(daemon, "sync.upload_crashed"), what="a failed upload")
        hq.down()
        wait_until(lambda: hq_state_metric(daemon) == "offline", what="HQ offline again")
        time.sleep(1.0)
        recovered_while_locked = log_events(daemon, "sync.upload_recovered")
        holder.execute("ROLLBACK")
        hq.up()
        wait_until(lambda: log_events(daemon, "sync.upload_recovered"), what="the upload")
    finally:
        holder.close()
        daemon.stop()

    assert recovered_while_locked == []
