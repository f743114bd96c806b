"""A database that takes no more writes: honest readiness, one log line, recovery."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.api import READY_PROBE_INTERVAL
from daemon.store import NO_ROWS, CommitFailed, Rows, Store, write_probe
from tests.conftest import REPO, START_TIMEOUT, Daemon, make_daemon

# Sizes of a gateway decision's response and audit event with the sample identities.
DECISION_RESPONSE_BYTES = 64
DECISION_EVENT_BYTES = 512
# Decisions that fill the pages of a new database, with room to spare.
MAX_FILL_DECISIONS = 2000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "db.sqlite3", tmp_path / "db.sqlite3.key")
    yield opened
    opened.close()


def _decision() -> Rows:
    """Return the rows of one decision and its audit event, as the resolver writes them."""
    now = time.time()
    return Rows(
        (
            (
                "INSERT INTO decisions (scan_event_id, request_hash, response, action, reason,"
                " decided_at) VALUES (?, ?, ?, 'ACCEPT', 'ACCEPTED', ?)",
                (str(uuid.uuid4()), os.urandom(32), os.urandom(DECISION_RESPONSE_BYTES), now),
            ),
            (
                "INSERT INTO outbox (event_id, created_at, body) VALUES (?, ?, ?)",
                (str(uuid.uuid4()), now, os.urandom(DECISION_EVENT_BYTES)),
            ),
        )
    )


def _set_max_page_count(store: Store, pages: int | None) -> int:
    """Cap the writer's database at ``pages`` pages, or at its current size when None."""

    def job(connection: sqlite3.Connection) -> int:
        limit = pages or connection.execute("PRAGMA main.page_count").fetchone()[0]
        return connection.execute(f"PRAGMA main.max_page_count = {limit}").fetchone()[0]

    return store.writer.submit_and_wait(job)


def _update_meta(connection: sqlite3.Connection) -> None:
    connection.execute(
        "INSERT INTO meta (key, value) VALUES ('small_write', ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (str(time.time()),),
    )


def _fill(store: Store) -> CommitFailed:
    """Commit decisions until the capped database takes no more; return the error."""
    for _ in range(MAX_FILL_DECISIONS):
        try:
            store.writer.submit_and_wait(_decision())
        except CommitFailed as exc:
            return exc
    raise AssertionError(f"{MAX_FILL_DECISIONS} decisions committed under max_page_count")


def test_full_database_recovers_on_decision_write(store: Store) -> None:
    with capture_logs() as logs:
        _set_max_page_count(store, None)
        error = _fill(store)
        failure_after_fill = store.writer.failure
        # The watchdog's empty job and a one-row update still commit on the full database.
        store.writer.submit_and_wait(NO_ROWS)
        failure_after_empty_job = store.writer.failure
        store.writer.submit_and_wait(_update_meta)
        failure_after_small_write = store.writer.failure
        with pytest.raises(CommitFailed) as probe_error:
            store.writer.submit_and_wait(write_probe())
        _set_max_page_count(store, 1_000_000)
        store.writer.submit_and_wait(write_probe())

    events = [entry["event"] for entry in logs if entry["event"].startswith("store.commit")]
    leftovers = store.reader.connection.execute(
        "SELECT (SELECT count(*) FROM decisions WHERE action = 'PROBE'),"
        " (SELECT count(*) FROM outbox WHERE length(body) != ?)",
        (DECISION_EVENT_BYTES,),
    ).fetchone()
    assert str(error) == "database or disk is full"
    assert error.sqlite_errorname == "SQLITE_FULL"
    assert failure_after_fill == "database or disk is full"
    assert failure_after_empty_job == "database or disk is full"
    assert failure_after_small_write == "database or disk is full"
    assert probe_error.value.sqlite_errorname == "SQLITE_FULL"
    assert store.writer.failure is None
    assert events == ["store.commit_failed", "store.commit_recovered"]
    assert leftovers == (0, 0)


def test_batched_empty_job_keeps_failure(store: Store) -> None:
    # A job that commits in the same batch as a failing decision proves nothing about it.
    _set_max_page_count(store, None)
    _fill(store)

    async def scenario() -> list:
        return await asyncio.gather(
            store.writer.submit(_decision()),
            store.writer.submit(NO_ROWS),
            return_exceptions=True,
        )

    results = asyncio.run(scenario())
    assert isinstance(results[0], CommitFailed)
    assert results[1] is None
    assert store.writer.failure == "database or disk is full"


class _NotifyDrain:
    """A datagram socket in place of systemd's notify socket that reads and drops messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._closed.is_set():
            try:
                self._sock.recv(4096)
            except TimeoutError:
                continue

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self._sock.close()


def _start_with_piped_log(daemon: Daemon) -> threading.Thread:
    """Start ``daemon`` with its log written through a pipe; return the thread that copies it.

    A file size limit applies to every regular file the daemon writes, its log too, and
    not to a pipe.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon", "serve", "--config", str(daemon.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, **daemon.env},
    )
    daemon.process = process

    def copy_log() -> None:
        assert process.stdout is not None
        with process.stdout as output, daemon.log_path.open("ab") as log:
            for line in output:
                log.write(line)
                log.flush()

    copier = threading.Thread(target=copy_log, daemon=True)
    copier.start()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            copier.join()
            raise RuntimeError(f"daemon exited at start:\n{daemon.log_path.read_text()}")
        try:
            if daemon.request("GET", "/healthz").status == 200:
                return copier
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"daemon did not become healthy:\n{daemon.log_path.read_text()}")


def _limit_file_size(daemon: Daemon, limit: int | None) -> None:
    """Set the daemon's file size limit (RLIMIT_FSIZE) in bytes; None lifts it.

    A write past the limit fails with EFBIG, which SQLite reports as a disk I/O error: to
    the daemon, a disk that takes no more data.
    """
    assert daemon.process is not None
    pid = daemon.process.pid
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))


def test_full_disk_readiness_logs_and_recovery(tmp_path: Path) -> None:
    notify = _NotifyDrain(tmp_path / "notify.sock")
    daemon = make_daemon(tmp_path / "daemon")
    # WATCHDOG_USEC of 0.4 s makes the watchdog commit an empty job every 0.2 s.
    daemon.env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    copier = _start_with_piped_log(daemon)
    try:
        ready_before = daemon.request("GET", "/readyz").status
        _limit_file_size(daemon, 0)
        # No decision comes in: only the probe of /readyz can notice the full disk.
        time.sleep(READY_PROBE_INTERVAL + 0.5)
        ready_idle = daemon.request("GET", "/readyz").status
        failed = []
        for _ in range(3):
            failed.append(daemon.scan("KEY-SHOPPER-5f1c2b"))
            # Meanwhile the watchdog's empty jobs commit.
            time.sleep(0.5)
        ready_failing = daemon.request("GET", "/readyz").status
        _limit_file_size(daemon, None)
        ready_after = daemon.request("GET", "/readyz").status
        scan_after = daemon.scan("KEY-SHOPPER-5f1c2b")
    finally:
        daemon.stop()
        copier.join()
        notify.close()

    lines = daemon.log_lines()
    events = [line["event"] for line in lines]
    request_failures = [line for line in lines if line["event"] == "request.failed"]
    assert ready_before == 200
    assert ready_idle == 503
    assert ready_failing == 503
    assert ready_after == 200
    assert [reply.status for reply in failed] == [500, 500, 500]
    for reply in failed:
        assert reply.headers["Content-Type"] == "application/problem+json"
        assert reply.json()["type"].endswith(":internal-error")
    assert scan_after.status == 200
    assert events.count("store.commit_failed") == 1
    assert events.count("store.commit_recovered") == 1
    assert events.index("store.commit_recovered") > max(
        index for index, event in enumerate(events) if event == "request.failed"
    )
    assert len(request_failures) == 3
    for line in request_failures:
        assert "exception" not in line
        assert line["error"] == "disk I/O error"
        assert "store.commit_failed" in line["detail"]
        assert line["scan_event_id"]
