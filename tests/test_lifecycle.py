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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

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


STOP_LOAD_CLIENTS = 8
# How long a client waits for a response, and for the daemon to close an idle connection.
STOP_READ_TIMEOUT = 10.0


def _scan_request(port: int, scan_id: str) -> bytes:
    """Build the raw bytes of a ResolveScan request for the sample shopper."""
    body = json.dumps(scan_body("KEY-SHOPPER-5f1c2b", scan_id=scan_id)).encode()
    head = (
        "POST /v1/identity/scan HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def _read_response(reader: BinaryIO) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Read one response with a Content-Length body from a kept-alive connection."""
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("the daemon closed the connection without a response")
    status = int(status_line.split()[1])
    headers = http.client.parse_headers(reader)
    body = reader.read(int(headers.get("Content-Length", "0")))
    return status, headers, body


def _decided(daemon: Daemon, scan_ids: list[str]) -> set[str]:
    connection = sqlite3.connect(daemon.database)
    try:
        rows = connection.execute("SELECT scan_event_id FROM decisions").fetchall()
    finally:
        connection.close()
    return {row[0] for row in rows} & set(scan_ids)


def test_sigterm_responds_to_every_request(daemon: Daemon) -> None:
    replies: list[tuple[str, int, http.client.HTTPMessage]] = []
    lost: list[str] = []

    def client() -> None:
        sock: socket.socket | None = None
        reader: BinaryIO | None = None
        try:
            while True:
                if sock is None:
                    try:
                        sock = socket.create_connection(
                            ("127.0.0.1", daemon.port), timeout=STOP_READ_TIMEOUT
                        )
                    except ConnectionRefusedError:
                        return  # the listener has closed, so this request was never sent
                    reader = sock.makefile("rb")
                assert reader is not None
                scan_id = str(uuid.uuid4())
                try:
                    sock.sendall(_scan_request(daemon.port, scan_id))
                    status, headers, _ = _read_response(reader)
                except OSError as exc:
                    lost.append(f"{scan_id}: {type(exc).__name__}: {exc}")
                    return
                replies.append((scan_id, status, headers))
                if headers.get("Connection", "").lower() == "close":
                    reader.close()
                    sock.close()
                    reader = None
                    sock = None
        finally:
            if reader is not None:
                reader.close()
            if sock is not None:
                sock.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(STOP_LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    started = time.monotonic()
    code = daemon.stop()
    stop_seconds = time.monotonic() - started
    for thread in threads:
        thread.join(timeout=WAIT)

    accepted = [scan_id for scan_id, status, _ in replies if status == 200]
    unavailable = [(scan_id, headers) for scan_id, status, headers in replies if status == 503]
    decided = _decided(daemon, [scan_id for scan_id, _, _ in replies])
    assert code == 0
    assert not any(thread.is_alive() for thread in threads)
    assert stop_seconds < 8.0
    assert lost == []
    assert {status for _, status, _ in replies} <= {200, 503}
    assert len(accepted) > 0
    assert set(accepted) <= decided
    for scan_id, headers in unavailable:
        assert headers.get("Retry-After") == "1", scan_id
        assert headers.get("Connection") == "close", scan_id
        assert scan_id not in decided


def test_sigterm_responds_on_open_connections(daemon: Daemon) -> None:
    connections = {
        name: socket.create_connection(("127.0.0.1", daemon.port), timeout=STOP_READ_TIMEOUT)
        for name in ("idle", "partial", "late")
    }
    readers = {name: sock.makefile("rb") for name, sock in connections.items()}
    try:
        for name, sock in connections.items():
            sock.sendall(_scan_request(daemon.port, str(uuid.uuid4())))
            status, headers, _ = _read_response(readers[name])
            assert status == 200, name
            assert "Connection" not in headers, name

        # One request whose headers are half sent when the stop begins, one sent after it.
        partial_id = str(uuid.uuid4())
        partial_request = _scan_request(daemon.port, partial_id)
        connections["partial"].sendall(partial_request[:40])
        time.sleep(0.1)
        mark = len(daemon.log_lines())
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _wait_for_log(daemon, "server.stopping", mark)
        connections["partial"].sendall(partial_request[40:])
        late_id = str(uuid.uuid4())
        connections["late"].sendall(_scan_request(daemon.port, late_id))

        for name in ("partial", "late"):
            status, headers, body = _read_response(readers[name])
            assert status == 503, name
            assert headers.get("Retry-After") == "1", name
            assert headers.get("Connection") == "close", name
            assert json.loads(body)["type"].endswith(":stopping"), name
            assert readers[name].read() == b"", name
        assert readers["idle"].read() == b""
        idle_closed_after = time.monotonic() - started
        code = daemon.stop()
    finally:
        for name, sock in connections.items():
            readers[name].close()
            sock.close()

    assert code == 0
    assert idle_closed_after < 5.0
    assert _decided(daemon, [partial_id, late_id]) == set()


def test_sigterm_closes_after_admitted_decision(daemon: Daemon) -> None:
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=STOP_READ_TIMEOUT)
    reader = sock.makefile("rb")
    # Another process holding the write lock keeps the decision from committing, so its
    # handler is still running when the stop begins.
    blocker = sqlite3.connect(daemon.database, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        scan_id = str(uuid.uuid4())
        sock.sendall(_scan_request(daemon.port, scan_id))
        # Time for the daemon to read and admit the request. The decision then waits on the
        # lock for up to the busy timeout (5 s), so this wait cannot make its commit fail.
        time.sleep(1.5)
        mark = len(daemon.log_lines())
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        _wait_for_log(daemon, "server.stopping", mark)
        blocker.execute("ROLLBACK")

        status, headers, body = _read_response(reader)
        closed = reader.read() == b""
    finally:
        blocker.close()
        reader.close()
        sock.close()

    assert daemon.stop() == 0
    assert status == 200
    assert json.loads(body)["action"] == "ACCEPT"
    assert headers.get("Connection") == "close"
    assert closed
    assert _decided(daemon, [scan_id]) == {scan_id}


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
