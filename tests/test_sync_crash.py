"""kill -9 in the middle of a batch apply or a snapshot rebuild: cursor and data agree."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import cachefile
from tests.conftest import SAMPLE_RECORDS, Daemon, make_daemon
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
    again, rebuilds without a worker, and loses no record."""
    hq.put(*make_records(BULK))
    hq.control.snapshot_line_delay = 0.05
    daemon = new_daemon(tmp_path, hq, "snapshot_batch_size = 1000", records=[])
    daemon.start()
    try:
        wait_until(lambda: hq.received.snapshot_lines_sent >= 8000, what="part of the snapshot")
        (pid,) = wait_until(lambda: snapshot_worker_pids(daemon), what="the worker")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: meta(daemon.database, "cursor") == hq.cursor(), what="the rebuild")
        assert local_versions(daemon.database) == versions_of(hq.records)
        assert hq.received.requests["snapshot"] == 2
        assert len(log_events(daemon, "sync.worker_failed")) == 1
        assert log_events(daemon, "sync.pull_crashed") == []
    finally:
        daemon.stop()
