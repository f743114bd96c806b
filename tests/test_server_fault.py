"""A real server fault gives a bare 500 and one log line with the traceback."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from daemon.store import open_reader
from tests.conftest import Daemon, make_daemon


def test_database_fault_gives_500_without_internals(daemon: Daemon) -> None:
    # Dropping the cache's table under the running daemon is a genuine fault in its storage.
    connection = open_reader(daemon.database, 5.0)
    connection.execute("DROP TABLE identities")
    connection.commit()
    connection.close()

    reply = daemon.scan("KEY-SHOPPER-5f1c2b")
    problem = reply.json()
    text = reply.body.decode()

    assert reply.status == 500
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert problem["status"] == 500
    assert "identities" not in text
    assert "Traceback" not in text
    failures = [line for line in daemon.log_lines() if line.get("event") == "request.failed"]
    assert len(failures) == 1
    assert "Traceback" in failures[0]["exception"]
    assert "no such table" in failures[0]["exception"]


def test_readyz_reports_database_fault(daemon: Daemon) -> None:
    assert daemon.request("GET", "/readyz").status == 200
    connection = open_reader(daemon.database, 5.0)
    connection.execute("DROP TABLE identities")
    connection.commit()
    connection.close()
    assert daemon.request("GET", "/readyz").status == 503


def test_database_fault_logged_once_per_minute(daemon: Daemon) -> None:
    # A probe polling /readyz must not fill the journal with one line per call.
    connection = open_reader(daemon.database, 5.0)
    connection.execute("DROP TABLE identities")
    connection.commit()
    connection.close()
    statuses = [daemon.request("GET", "/readyz").status for _ in range(5)]
    events = [line for line in daemon.log_lines() if line["event"] == "health.database_failed"]
    assert statuses == [503] * 5
    assert len(events) == 1


def test_readyz_follows_a_locked_database(tmp_path: Path) -> None:
    # Another connection holding the write lock longer than busy_timeout makes every commit
    # fail: /readyz must say so, and say ready again once the lock is gone, with no decision
    # needed in between.
    daemon = make_daemon(tmp_path / "locked")
    text = daemon.config.read_text(encoding="utf-8")
    daemon.config.write_text(
        text.replace("[database]\n", '[database]\nbusy_timeout = "0.2s"\n'), "utf-8"
    )
    daemon.start()
    holder = sqlite3.connect(daemon.database, isolation_level=None, timeout=5)
    try:
        holder.execute("BEGIN IMMEDIATE")
        scan_while_locked = daemon.scan("KEY-SHOPPER-5f1c2b")
        ready_while_locked = daemon.request("GET", "/readyz").status
        holder.execute("ROLLBACK")
        ready_after = daemon.request("GET", "/readyz").status
        scan_after = daemon.scan("KEY-SHOPPER-5f1c2b")
    finally:
        holder.close()
        daemon.stop()

    events = [line["event"] for line in daemon.log_lines()]
    assert scan_while_locked.status == 500
    assert ready_while_locked == 503
    assert ready_after == 200
    assert scan_after.status == 200
    assert events.count("store.commit_failed") == 1
    assert events.count("store.commit_recovered") == 1


def test_readyz_probe_timeout_names_cause(tmp_path: Path) -> None:
    # With the default busy_timeout (5 s) the probe commit outlasts its 2 s wait.
    daemon = make_daemon(tmp_path / "slow-lock")
    daemon.start()
    holder = sqlite3.connect(daemon.database, isolation_level=None, timeout=5)
    try:
        holder.execute("BEGIN IMMEDIATE")
        scan_while_locked = daemon.scan("KEY-SHOPPER-5f1c2b")
        ready_while_locked = daemon.request("GET", "/readyz").status
        holder.execute("ROLLBACK")
    finally:
        holder.close()
        daemon.stop()

    failures = [line for line in daemon.log_lines() if line["event"] == "health.database_failed"]
    assert scan_while_locked.status == 500
    assert ready_while_locked == 503
    assert len(failures) == 1
    assert "write lock" in failures[0]["error"]
