"""A real server fault gives a bare 500 and one log line with the traceback."""

from __future__ import annotations

from daemon.store import open_reader
from tests.conftest import Daemon


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
