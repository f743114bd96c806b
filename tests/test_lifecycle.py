"""Life under systemd: notify messages on a real socket, watchdog, drain, reload, metrics."""

from __future__ import annotations

import http.client
import itertools
import json
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import parse_config
from daemon.runtime import changed_settings
from tests.conftest import Daemon, edit_config, make_daemon, scan_body

WAIT = 15.0


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket, recording every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def receive_until(self, predicate, timeout: float = WAIT) -> str:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data))
            if predicate(data):
                return data
        raise AssertionError(f"no matching notify message; got {[m for _, m in self.messages]}")

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        collected = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            collected.append((time.monotonic(), data))
        self.messages.extend(collected)
        return collected

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def notified_daemon(tmp_path: Path, notify_socket: NotifySocket) -> Iterator[Daemon]:
    instance = make_daemon(tmp_path / "d")
    # WATCHDOG_USEC of 0.4 s gives a ping every 0.2 s.
    instance.env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"}
    yield instance
    if instance.process is not None:
        instance.stop()


def test_ready_only_after_port_accepts(
    notified_daemon: Daemon, notify_socket: NotifySocket
) -> None:
    notified_daemon.start(wait=False)
    message = notify_socket.receive_until(lambda m: "READY=1" in m)
    # The port must accept at the moment READY arrives.
    with socket.create_connection(("127.0.0.1", notified_daemon.port), timeout=1):
        pass
    assert "STATUS=serving 127.0.0.1" in message
    counted = notify_socket.receive_until(lambda m: "13 identities" in m)
    assert "devices 0/0 available" in counted


def test_status_while_database_opens(notified_daemon: Daemon, notify_socket: NotifySocket) -> None:
    # Before READY the daemon reports what it waits for, and asks systemd for more time while a
    # long migration or integrity check runs (not reached with this small database).
    notified_daemon.start(wait=False)
    notify_socket.receive_until(lambda m: "READY=1" in m)
    texts = [text for _, text in notify_socket.messages]
    first_ready = next(index for index, text in enumerate(texts) if "READY=1" in text)
    assert any("STATUS=opening the database" in text for text in texts[:first_ready])


def test_watchdog_cadence(notified_daemon: Daemon, notify_socket: NotifySocket) -> None:
    notified_daemon.start(wait=False)
    notify_socket.receive_until(lambda m: "READY=1" in m)
    pings = [t for t, m in notify_socket.collect(2.0) if m == "WATCHDOG=1"]
    # One ping every 0.2 s gives about 10 in 2 s; allow for a loaded machine.
    assert 6 <= len(pings) <= 12
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    assert max(gaps) < 0.4


def test_watchdog_stops_while_process_frozen(
    notified_daemon: Daemon, notify_socket: NotifySocket
) -> None:
    notified_daemon.start(wait=False)
    notify_socket.receive_until(lambda m: "READY=1" in m)
    assert notified_daemon.process is not None
    notified_daemon.process.send_signal(signal.SIGSTOP)
    try:
        notify_socket.collect(0.3)  # drain pings already queued
        frozen = [m for _, m in notify_socket.collect(1.0) if m == "WATCHDOG=1"]
    finally:
        notified_daemon.process.send_signal(signal.SIGCONT)
    assert frozen == []
    notify_socket.receive_until(lambda m: m == "WATCHDOG=1", timeout=5)


def test_watchdog_withheld_while_writer_blocked(
    notified_daemon: Daemon, notify_socket: NotifySocket
) -> None:
    notified_daemon.start(wait=False)
    notify_socket.receive_until(lambda m: "READY=1" in m)
    # Another process holding the write lock keeps the daemon's writer from committing.
    blocker = sqlite3.connect(notified_daemon.database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        notify_socket.collect(0.6)  # the check in progress may still ping once
        blocked = [m for _, m in notify_socket.collect(1.5) if m == "WATCHDOG=1"]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert blocked == []
    notify_socket.receive_until(lambda m: m == "WATCHDOG=1", timeout=10)
    events = [line.get("event") for line in notified_daemon.log_lines()]
    assert "watchdog.unhealthy" in events


def test_stopping_on_sigterm(notified_daemon: Daemon, notify_socket: NotifySocket) -> None:
    notified_daemon.start()
    notify_socket.receive_until(lambda m: "READY=1" in m)
    assert notified_daemon.process is not None
    notified_daemon.process.send_signal(signal.SIGTERM)
    notify_socket.receive_until(lambda m: m == "STOPPING=1")
    assert notified_daemon.stop() == 0


def test_sigterm_drain_loses_no_decision(daemon: Daemon) -> None:
    statuses: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        try:
            while not stop.is_set():
                body = json.dumps(scan_body("KEY-SHOPPER-5f1c2b")).encode()
                connection.request(
                    "POST", "/v1/identity/scan", body, {"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            # After the listener closes, the next request on a kept-alive connection fails
            # before the daemon reads it; that request was never decided.
            failures.append(type(exc).__name__)
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    assert daemon.stop() == 0
    stop.set()
    for thread in threads:
        thread.join()

    ok = statuses.count(200)
    connection = sqlite3.connect(daemon.database)
    try:
        stored = connection.execute("SELECT count(*) FROM outbox").fetchone()[0]
    finally:
        connection.close()
    assert ok > 0
    # A request whose body was still on its way when the daemon began to stop gets 503, and
    # it was never decided. Every other request was decided and got 200.
    assert set(statuses) <= {200, 503}
    assert stored == ok


def _wait_for_log(daemon: Daemon, event: str, after: int) -> dict:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        lines = daemon.log_lines()[after:]
        for line in lines:
            if line.get("event") == event:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no {event} log line")


def test_sighup_applies_policy_on_open_connection(daemon: Daemon) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)

    def exit_scan() -> dict:
        body = json.dumps(scan_body("KEY-SUSPENDED-4c4c12", location="EXIT")).encode()
        connection.request("POST", "/v1/identity/scan", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return json.loads(response.read())

    assert exit_scan()["action"] == "ACCEPT"
    sock_before = connection.sock
    mark = len(daemon.log_lines())
    daemon.config.write_text(daemon.config.read_text() + "\n[policy]\nexit_override = []\n")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    reloaded = _wait_for_log(daemon, "config.reloaded", mark)

    assert reloaded["changed"] == ["policy.exit_override"]
    assert exit_scan()["action"] == "REJECT"
    assert connection.sock is sock_before
    connection.close()


def test_reload_names_restart_settings(daemon: Daemon) -> None:
    mark = len(daemon.log_lines())
    edit_config(
        daemon.config,
        ('level = "info"\n', 'level = "debug"\n[policy]\nmax_scan_age = "60s"\n'),
    )
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    reloaded = _wait_for_log(daemon, "config.reloaded", mark)
    restart = _wait_for_log(daemon, "config.restart_required", mark)

    assert reloaded["changed"] == ["policy.max_scan_age"]
    assert restart["settings"] == ["logging.level"]


_DEVICE = '[[devices]]\nname = "{name}"\nkind = "serial"\nstation = "till-1"\npath = "{path}"\n'
_BASE = '[stores]\nids = ["S1"]\n[local]\nstore_id = "S1"\n'


@pytest.mark.parametrize(
    ("before", "after", "changed"),
    [
        ("", "", []),
        ("", '[policy]\nmax_scan_age = "60s"\n', ["policy.max_scan_age"]),
        ('[policy]\nmax_scan_age = "60s"\n', '[policy]\nmax_scan_age = "1m"\n', []),
        ("", "[auth]\n", ["auth"]),
        ("[auth]\n", "", ["auth"]),
        ("", "[server]\nport = 8081\n", ["server.port"]),
        (
            _DEVICE.format(name="front", path="/dev/ttyS0"),
            _DEVICE.format(name="front", path="/dev/ttyS1"),
            ["devices[front].path"],
        ),
        ("", _DEVICE.format(name="back", path="/dev/ttyS2"), ["devices[back]"]),
        (_DEVICE.format(name="back", path="/dev/ttyS2"), "", ["devices[back]"]),
        (
            _DEVICE.format(name="a", path="/dev/ttyS0")
            + _DEVICE.format(name="b", path="/dev/ttyS1"),
            _DEVICE.format(name="b", path="/dev/ttyS1")
            + _DEVICE.format(name="a", path="/dev/ttyS0"),
            [],
        ),
    ],
)
def test_changed_settings(before: str, after: str, changed: list[str]) -> None:
    old = parse_config(_BASE + before, source="before.toml")
    new = parse_config(_BASE + after, source="after.toml")

    assert changed_settings(old, new) == changed


def test_sighup_with_broken_config_keeps_old(daemon: Daemon) -> None:
    mark = len(daemon.log_lines())
    daemon.config.write_text(daemon.config.read_text() + "\n[policy]\nmax_scan_age = 5\n")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    failure = _wait_for_log(daemon, "config.reload_failed", mark)
    assert "policy.max_scan_age" in failure["error"]
    assert daemon.scan("KEY-SUSPENDED-4c4c12", location="EXIT").json()["action"] == "ACCEPT"
    assert daemon.request("GET", "/readyz").status == 200


def test_metrics_parse(daemon: Daemon) -> None:
    daemon.scan("KEY-SHOPPER-5f1c2b")
    daemon.scan("NO-SUCH-KEY")
    reply = daemon.request("GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    decisions = {
        (s.labels["action"], s.labels["reason"]): s.value
        for s in families["identity_connector_decisions"].samples
        if s.name.endswith("_total")
    }
    assert reply.status == 200
    assert decisions[("ACCEPT", "ACCEPTED")] == 1.0
    assert decisions[("REJECT", "UNKNOWN_KEY")] == 1.0
    assert families["identity_connector_cache_identities"].samples[0].value == 13
    assert families["identity_connector_outbox_depth"].samples[0].value == 2
    histogram = families["identity_connector_decision_latency_seconds"]
    count = next(s.value for s in histogram.samples if s.name.endswith("_count"))
    assert count == 2


def test_outbox_bounded_without_hq(tmp_path: Path) -> None:
    instance = make_daemon(tmp_path / "d")
    # Events older than the 30-day limit, as if the box had run for months without HQ.
    connection = sqlite3.connect(instance.database)
    old = time.time() - 31 * 86400
    connection.executemany(
        "INSERT INTO outbox (event_id, created_at, body) VALUES (?, ?, ?)",
        [(f"old-{index}", old, b"{}") for index in range(50)],
    )
    connection.commit()
    connection.close()
    instance.start()
    try:
        line = _wait_for_log(instance, "outbox.trimmed_without_hq", 0)
    finally:
        instance.stop()
    assert line["dropped"] == 50
