"""Local scanning against a daemon subprocess: serial scanners on pseudo-terminals.

Each test drives its own device at its own station, so the module shares one
daemon. Scanner output goes in on the master side of a pty, decisions come
back on the SSE stream, and feedback bytes come back on the master side.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import socket
import sqlite3
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    SAMPLE_RECORDS,
    Daemon,
    busy_timeout,
    edit_config,
    free_port,
    labelled_samples,
    make_daemon,
    run_cli,
    write_config,
)
from tests.test_write_locks import cache_file_of, write_lock
from tests.tls_helpers import CertificateAuthority, client_context, make_secure_daemon

# Generous, because the suite must pass on a loaded two-core machine.
WAIT = 15.0

GOOD_READ = b"\x06"
BAD_READ = b"\x15"


def point_link(link: Path, target: str) -> None:
    """Point the symlink ``link`` at ``target`` atomically, as udev replaces a by-id link."""
    staging = link.with_name(link.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    staging.symlink_to(target)
    os.replace(staging, link)


class PtyScanner:
    """A serial scanner played on a pseudo-terminal whose slave the daemon opens by a symlink.

    Closing both sides is an unplug: the daemon's read fails and the slave path vanishes.
    ``replug`` opens a new pair and points the symlink at it, as udev does for a scanner that
    comes back under another tty number.
    """

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self._slave = -1
        self._open()

    def _open(self) -> None:
        self.master, self._slave = os.openpty()
        # Raw mode, so nothing echoes back or rewrites CR before the driver sets its own.
        tty.setraw(self._slave)
        point_link(self.link, os.ttyname(self._slave))

    def write(self, data: bytes) -> float:
        """Send bytes as the scanner would; return the monotonic time they were written."""
        os.write(self.master, data)
        return time.monotonic()

    def scan(self, value: str) -> float:
        return self.write(value.encode() + b"\r")

    def read_feedback(self, size: int, timeout: float = WAIT) -> bytes:
        """Read up to ``size`` bytes the daemon wrote back, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        received = b""
        while len(received) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select([self.master], [], [], remaining)
            if readable:
                received += os.read(self.master, size - len(received))
        return received

    def hold_output(self, held: bool) -> None:
        """Stop or restart the daemon's writes to the scanner, as flow control (XOFF) does."""
        termios.tcflow(self._slave, termios.TCOOFF if held else termios.TCOON)

    def unplug(self) -> None:
        if self.master < 0:
            return
        os.close(self.master)
        os.close(self._slave)
        self.master = self._slave = -1

    def replug(self) -> None:
        self.unplug()
        self._open()


@dataclass(frozen=True)
class SseEvent:
    name: str
    data: dict[str, Any]


class EventStream:
    """A client of GET /v1/local/events that collects events on a thread of its own."""

    def __init__(self, port: int, path: str = "/v1/local/events") -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT * 4)
        self._connection.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self._connection.getresponse()
        self.events: list[SseEvent] = []
        self._changed = threading.Condition()
        self.ended = False
        self._thread = threading.Thread(target=self._read, name="sse-client", daemon=True)
        if self.response.status == 200:
            self._thread.start()

    def _read(self) -> None:
        name = None
        data_lines: list[str] = []
        try:
            while True:
                raw = self.response.readline()
                if not raw:
                    break
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data_lines.append(line.removeprefix("data: "))
                elif line == "" and name is not None:
                    self._append(SseEvent(name, json.loads("\n".join(data_lines))))
                    name, data_lines = None, []
        except (OSError, ValueError, http.client.HTTPException):
            pass
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def _append(self, event: SseEvent) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def mark(self) -> int:
        """Return a position; ``wait_for`` with ``after`` set to it skips older events."""
        with self._changed:
            return len(self.events)

    def wait_for(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda data: True,
        after: int = 0,
        timeout: float = WAIT,
    ) -> SseEvent:
        """Wait for an event called ``name`` whose data satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events[after:]:
                    if event.name == name and predicate(event.data):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.ended:
                    raise AssertionError(
                        f"no {name} event matched within {timeout} s; received {self.events}"
                    )
                self._changed.wait(remaining)

    def wait_ended(self, timeout: float = WAIT) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.ended, timeout)

    def since(self, after: int, name: str) -> list[SseEvent]:
        with self._changed:
            return [event for event in self.events[after:] if event.name == name]

    def close(self) -> None:
        # Shut the socket down first, so the reader thread wakes with end of stream. Closing
        # the connection under it would race with its read.
        sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(timeout=WAIT)
        self._connection.close()


SHOPPER = "KEY-SHOPPER-5f1c2b"
LOYALTY = "KEY-LOYALTY-71bc04"
CASH = "KEY-CASH-33aa90"
ASSOCIATE = "KEY-ASSOCIATE-8e2d11"
SECOND_ASSOCIATE = "KEY-ASSOCIATE-2-c0ffee"
UNKNOWN = "KEY-NOBODY-000000"

RECORDS = [
    *SAMPLE_RECORDS,
    {
        "credentialId": "c-associate-2",
        "key": SECOND_ASSOCIATE,
        "id": "associate-2",
        "type": "ASSOCIATE",
        "status": "ACTIVE",
        "stores": ["*"],
        "version": 1,
    },
]

# Short session and debounce times, so expiry and the close-by-badge read fit the suite's budget.
SESSION_TIMEOUT = 3.0
DEBOUNCE = 0.5
DEVICES = [
    "unattended",
    "sessions",
    "renewal",
    "debounce",
    "health",
    "replace",
    "dropped",
    "feedback",
    "silence",
]

# Settings that some devices of the shared daemon add to device_table's.
DEVICE_SETTINGS = {
    # The silence reopen comes long before partial_timeout would end a partial frame.
    "silence": 'silence_timeout = "300ms"\npartial_timeout = "10s"\n',
}


def device_table(name: str, link: Path) -> str:
    settings = DEVICE_SETTINGS.get(name, "")
    return f"""
[[devices]]
name = "dev-{name}"
kind = "serial"
station = "station-{name}"
path = "{link}"
good_read_feedback = "{GOOD_READ.hex()}"
bad_read_feedback = "{BAD_READ.hex()}"
reconnect_delay = 0.05
reconnect_delay_max = 0.2
{settings}"""


@dataclass
class Rig:
    daemon: Daemon
    scanners: dict[str, PtyScanner]
    stream: EventStream

    def decided(
        self, device: str, identity_id: str | None, after: int, timeout: float = WAIT
    ) -> dict[str, Any]:
        """Wait for the decision of a scan at ``device`` for ``identity_id``."""
        return self.stream.wait_for(
            "scan.decided",
            lambda data: data["device"] == f"dev-{device}" and data["id"] == identity_id,
            after=after,
            timeout=timeout,
        ).data

    def scan(self, device: str, value: str, identity_id: str | None) -> dict[str, Any]:
        """Scan ``value`` at ``device`` and return its decision."""
        mark = self.stream.mark()
        self.scanners[device].scan(value)
        return self.decided(device, identity_id, mark)

    def outbox_event(self, event_id: str) -> dict[str, Any]:
        connection = sqlite3.connect(f"file:{self.daemon.database}?mode=ro", uri=True)
        try:
            row = connection.execute(
                "SELECT body FROM outbox WHERE event_id = ?", (event_id,)
            ).fetchone()
        finally:
            connection.close()
        assert row is not None, f"event {event_id} not in the outbox"
        return json.loads(row[0])


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory = tmp_path_factory.mktemp("local")
    scanners = {name: PtyScanner(directory / f"tty-{name}") for name in DEVICES}
    extra = f"""
[local]
session_timeout = "{SESSION_TIMEOUT}s"
debounce = "{int(DEBOUNCE * 1000)}ms"
events_keepalive = "1s"
""" + "".join(device_table(name, scanner.link) for name, scanner in scanners.items())
    daemon = make_daemon(directory / "daemon", extra, RECORDS)
    daemon.start()
    stream = EventStream(daemon.port)
    try:
        assert stream.response.status == 200
        for name in DEVICES:
            stream.wait_for(
                "device.health",
                lambda data, name=name: data["device"] == f"dev-{name}" and data["available"],
            )
        yield Rig(daemon, scanners, stream)
    finally:
        if daemon.process is not None:
            daemon.stop()
        stream.close()
        for scanner in scanners.values():
            scanner.unplug()


def test_unattended_scan_decided(rig: Rig) -> None:
    decision = rig.scan("unattended", SHOPPER, "shopper-1")

    assert decision["action"] == "ACCEPT"
    assert decision["type"] == "SHOPPER"
    assert decision["reason"] == "ACCEPTED"
    assert decision["channel"] == "OPTICAL"
    assert decision["location"] == "MANUAL_IN_STORE"
    assert decision["station"] == "station-unattended"
    assert decision["associate"] == "unattended"
    assert rig.scanners["unattended"].read_feedback(1) == GOOD_READ


def test_unattended_scan_in_outbox(rig: Rig) -> None:
    decision = rig.scan("unattended", LOYALTY, "loyalty-1")
    rig.scanners["unattended"].read_feedback(1)

    event = rig.outbox_event(decision["eventId"])
    assert event["source"] == "device"
    assert event["device"] == "dev-unattended"
    assert event["station"] == "station-unattended"
    assert event["associate"] == "unattended"
    assert event["location"] == "MANUAL_IN_STORE"
    assert event["identityId"] == "loyalty-1"
    assert LOYALTY not in json.dumps(event)


def test_unknown_key_rejected_with_feedback(rig: Rig) -> None:
    decision = rig.scan("unattended", UNKNOWN, None)

    assert decision["action"] == "REJECT"
    assert decision["reason"] == "UNKNOWN_KEY"
    assert rig.scanners["unattended"].read_feedback(1) == BAD_READ


def test_decision_logged_without_value(rig: Rig) -> None:
    decision = rig.scan("unattended", CASH, "cash-1")
    rig.scanners["unattended"].read_feedback(1)

    lines = [
        line
        for line in rig.daemon.log_lines()
        if line.get("event") == "scan.decided" and line.get("device") == "dev-unattended"
    ]
    assert decision["keyFingerprint"] in [line["key_fingerprint"] for line in lines]
    assert CASH not in rig.daemon.log_path.read_text()


def test_session_opens_attributes_and_closes(rig: Rig) -> None:
    mark = rig.stream.mark()
    opened = rig.scan("sessions", ASSOCIATE, "associate-1")
    attended = rig.scan("sessions", SHOPPER, "shopper-1")
    time.sleep(DEBOUNCE + 0.2)  # the same badge within the debounce window would not count
    closed = rig.scan("sessions", ASSOCIATE, "associate-1")
    after = rig.scan("sessions", LOYALTY, "loyalty-1")

    assert opened["session"] == "opened"
    assert attended["associate"] == "associate-1"
    assert rig.outbox_event(attended["eventId"])["associate"] == "associate-1"
    assert closed["session"] == "closed"
    assert after["associate"] == "unattended"
    changes = [
        event.data["change"]
        for event in rig.stream.since(mark, "station.session")
        if event.data["station"] == "station-sessions"
    ]
    assert changes == ["opened", "closed"]


def test_other_badge_replaces_session(rig: Rig) -> None:
    rig.scan("replace", ASSOCIATE, "associate-1")
    replaced = rig.scan("replace", SECOND_ASSOCIATE, "associate-2")
    attended = rig.scan("replace", SHOPPER, "shopper-1")

    assert replaced["session"] == "opened"
    assert attended["associate"] == "associate-2"


def test_session_renewed_then_expires(rig: Rig) -> None:
    opened = rig.scan("renewal", ASSOCIATE, "associate-1")
    opened_at = time.monotonic()
    time.sleep(SESSION_TIMEOUT * 0.6)
    renewing = rig.scan("renewal", SHOPPER, "shopper-1")
    # Past the first expiry, but inside the one the scan above renewed.
    time.sleep(max(0.0, opened_at + SESSION_TIMEOUT + 0.5 - time.monotonic()))
    renewed = rig.scan("renewal", LOYALTY, "loyalty-1")
    mark = rig.stream.mark()
    expired = rig.stream.wait_for(
        "station.session",
        lambda data: data["station"] == "station-renewal" and data["change"] == "expired",
        after=mark,
        timeout=SESSION_TIMEOUT + WAIT,
    )
    after = rig.scan("renewal", CASH, "cash-1")

    assert opened["session"] == "opened"
    assert renewing["associate"] == "associate-1"
    assert renewed["associate"] == "associate-1"
    assert expired.data["associate"] == "associate-1"
    assert after["associate"] == "unattended"


def test_repeated_value_counts_once(rig: Rig) -> None:
    scanner = rig.scanners["debounce"]
    mark = rig.stream.mark()
    scanner.write(f"{SHOPPER}\r{SHOPPER}\r{LOYALTY}\r".encode())
    rig.decided("debounce", "loyalty-1", mark)

    shopper_decisions = [
        event for event in rig.stream.since(mark, "scan.decided") if event.data["id"] == "shopper-1"
    ]
    assert len(shopper_decisions) == 1
    assert scanner.read_feedback(2) == GOOD_READ * 2
    assert scanner.read_feedback(1, timeout=0.3) == b""


def test_held_feedback_does_not_delay_scans(rig: Rig) -> None:
    scanner = rig.scanners["feedback"]
    scanner.hold_output(True)
    try:
        mark = rig.stream.mark()
        scanner.scan(SHOPPER)
        rig.decided("feedback", "shopper-1", mark)
        # The driver waits 1 s for a held feedback write; the next scan must not.
        sent = scanner.scan(LOYALTY)
        rig.decided("feedback", "loyalty-1", mark)
        decided_after = time.monotonic() - sent
        # A second write that fails after the first one did gets no line of its own.
        time.sleep(1.2)
        scanner.scan(CASH)
        rig.decided("feedback", "cash-1", mark)
        time.sleep(1.3)
    finally:
        scanner.hold_output(False)
    scanner.read_feedback(8, timeout=0.5)

    assert decided_after < 0.8
    failures = [
        line
        for line in rig.daemon.log_lines()
        if line.get("event") == "serial.feedback_failed" and line.get("device") == "dev-feedback"
    ]
    assert len(failures) == 1


def test_repeat_after_window_counts(rig: Rig) -> None:
    first = rig.scan("debounce", CASH, "cash-1")
    time.sleep(DEBOUNCE + 0.2)
    second = rig.scan("debounce", CASH, "cash-1")

    assert first["eventId"] != second["eventId"]


def dropped_read_counts(rig: Rig, device: str) -> dict[str, float]:
    """Read identity_connector_device_dropped_reads_total for ``device`` by reason."""
    family = "identity_connector_device_dropped_reads"
    return labelled_samples(rig.daemon, family, "reason", device=device)


def test_dropped_reads_not_decided_but_counted(rig: Rig) -> None:
    scanner = rig.scanners["dropped"]
    mark = rig.stream.mark()
    # Two blank frames, one that is not UTF-8, then a good scan.
    scanner.write(b"   \r\x00\r\xff\xfe\r" + SHOPPER.encode() + b"\r")
    decision = rig.decided("dropped", "shopper-1", mark)

    decisions = rig.stream.since(mark, "scan.decided")
    assert [event.data["device"] for event in decisions].count("dev-dropped") == 1
    assert decision["action"] == "ACCEPT"
    assert scanner.read_feedback(2, timeout=0.5) == GOOD_READ
    assert dropped_read_counts(rig, "dev-dropped") == {"blank": 2.0, "undecodable": 1.0}
    blank = [
        line
        for line in rig.daemon.log_lines()
        if line.get("event") == "scan.dropped" and line.get("device") == "dev-dropped"
    ]
    assert [line["reason"] for line in blank] == ["blank"]


def wait_for_dropped_reads(rig: Rig, device: str, timeout: float) -> dict[str, float]:
    """Poll the dropped-read counts of ``device`` until one appears or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not (counts := dropped_read_counts(rig, device)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return counts


def test_silence_reopen_counts_partial_frame(rig: Rig) -> None:
    counts: dict[str, float] = {}
    for _ in range(3):
        # Bytes that arrive while the port is being reopened are flushed by the open, as
        # for a real scanner, so the frame is sent again if it never reached the driver.
        rig.scanners["silence"].write(b"KEY-PART")
        counts = wait_for_dropped_reads(rig, "dev-silence", timeout=WAIT / 5)
        if counts:
            break
    time.sleep(1.0)  # three more silence reopens, which must not count the frame again

    assert counts == {"incomplete": 1.0}
    assert dropped_read_counts(rig, "dev-silence") == {"incomplete": 1.0}
    drops = [
        line
        for line in rig.daemon.log_lines()
        if line.get("event") == "serial.frame_dropped" and line.get("device") == "dev-silence"
    ]
    assert [(line["reason"], line["size"]) for line in drops] == [("incomplete", 8)]


def test_health_on_unplug_and_replug(rig: Rig) -> None:
    scanner = rig.scanners["health"]
    mark = rig.stream.mark()
    scanner.unplug()
    lost = rig.stream.wait_for(
        "device.health", lambda data: data["device"] == "dev-health", after=mark
    )
    reported = rig.daemon.request("GET", "/v1/local/devices").json()
    mark = rig.stream.mark()
    scanner.replug()
    back = rig.stream.wait_for(
        "device.health", lambda data: data["device"] == "dev-health", after=mark
    )
    decision = rig.scan("health", SHOPPER, "shopper-1")

    assert lost.data["available"] is False
    assert lost.data["error"]
    state = {device["device"]: device for device in reported["devices"]}["dev-health"]
    assert state["available"] is False
    assert back.data["available"] is True
    assert decision["action"] == "ACCEPT"


def test_unplug_logged_once(rig: Rig) -> None:
    scanner = rig.scanners["health"]
    mark = rig.stream.mark()
    scanner.unplug()
    rig.stream.wait_for("device.health", lambda data: data["device"] == "dev-health", after=mark)
    time.sleep(0.6)  # several reconnect attempts at the 50-200 ms backoff
    scanner.replug()
    rig.stream.wait_for(
        "device.health",
        lambda data: data["device"] == "dev-health" and data["available"],
        after=mark,
    )

    events = [
        line["event"]
        for line in rig.daemon.log_lines()
        if line.get("device") == "dev-health"
        and line.get("event") in ("device.unavailable", "device.available")
    ]
    # The start logs one device.available, and each outage one line of each kind.
    assert events.count("device.unavailable") == events.count("device.available") - 1


def test_devices_command_shows_health(rig: Rig) -> None:
    result = run_cli("devices", "--config", str(rig.daemon.config))

    assert result.returncode == 0, result.stderr
    assert "Serial ports:" in result.stdout
    assert "PC/SC readers:" in result.stdout
    assert "Input devices:" in result.stdout
    assert "dev-unattended  kind=serial  station=station-unattended  available" in result.stdout


def test_devices_command_without_daemon(tmp_path: Path) -> None:
    config = write_config(tmp_path, free_port(), device_table("absent", tmp_path / "tty"))

    result = run_cli("devices", "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert "daemon not running" in result.stdout
    assert "dev-absent  kind=serial  station=station-absent" in result.stdout


def test_stream_starts_with_health(rig: Rig) -> None:
    stream = EventStream(rig.daemon.port)
    try:
        first = stream.wait_for("device.health", lambda data: data["device"] == "dev-unattended")
    finally:
        stream.close()

    assert first.data["available"] is True
    assert first.data["station"] == "station-unattended"


def test_stream_ends_at_shutdown(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path / "daemon")
    daemon.start()
    stream = EventStream(daemon.port)
    try:
        started = time.monotonic()
        code = daemon.stop()
        ended = stream.wait_ended()
    finally:
        stream.close()

    assert code == 0
    assert ended
    # An open stream must not hold the shutdown for the 10 s drain timeout.
    assert time.monotonic() - started < 8.0


def test_reload_starts_added_device(tmp_path: Path) -> None:
    first = PtyScanner(tmp_path / "tty-first")
    added = PtyScanner(tmp_path / "tty-added")
    daemon = make_daemon(tmp_path / "daemon", device_table("first", first.link))
    daemon.start()
    stream = EventStream(daemon.port)
    try:
        stream.wait_for("device.health", lambda data: data["device"] == "dev-first")
        with daemon.config.open("a", encoding="utf-8") as config:
            config.write(device_table("added", added.link))
        mark = stream.mark()
        daemon.process.send_signal(signal.SIGHUP)
        health = stream.wait_for(
            "device.health",
            lambda data: data["device"] == "dev-added" and data["available"],
            after=mark,
        )
        mark = stream.mark()
        added.scan(SHOPPER)
        decision = stream.wait_for(
            "scan.decided", lambda data: data["device"] == "dev-added", after=mark
        )
    finally:
        daemon.stop()
        stream.close()
        first.unplug()
        added.unplug()

    assert health.data["station"] == "station-added"
    assert decision.data["id"] == "shopper-1"


def test_scan_with_feedback_survives_kill(tmp_path: Path) -> None:
    # The beep means the scan counted, so its audit event must be on disk before the feedback
    # byte leaves. A kill right after the beep then loses nothing.
    scanner = PtyScanner(tmp_path / "tty-kill")
    daemon = make_daemon(tmp_path / "daemon", device_table("kill", scanner.link), RECORDS)
    daemon.start()
    try:
        _wait_until_device_available(daemon.port, "dev-kill")
        counts = []
        for _ in range(5):
            scanner.scan(SHOPPER)
            assert scanner.read_feedback(1) == GOOD_READ
            daemon.kill()
            counts.append(_outbox_rows(daemon.database))
            # A new process starts with no debounce memory, so the same value counts again.
            daemon.start()
            _wait_until_device_available(daemon.port, "dev-kill")
    finally:
        if daemon.process is not None:
            daemon.stop()
        scanner.unplug()
    assert counts == [1, 2, 3, 4, 5]


def test_scan_beside_locked_cache_file(tmp_path: Path) -> None:
    # An import holds the cache file's write lock for a whole batch. A device scan writes
    # only the database, so its audit event must commit without waiting for that lock.
    scanner = PtyScanner(tmp_path / "tty-lock")
    daemon = make_daemon(tmp_path / "daemon", device_table("lock", scanner.link), RECORDS)
    edit_config(daemon.config, busy_timeout("0.5s"))
    daemon.start()
    try:
        _wait_until_device_available(daemon.port, "dev-lock")
        with write_lock(cache_file_of(daemon.database)):
            scanner.scan(SHOPPER)
            feedback = scanner.read_feedback(1)
            deadline = time.monotonic() + 5
            while _outbox_rows(daemon.database) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            recorded = _outbox_rows(daemon.database)
        failures = [line for line in daemon.log_lines() if line["event"] == "scan.record_failed"]
    finally:
        if daemon.process is not None:
            daemon.stop()
        scanner.unplug()

    assert feedback == GOOD_READ
    assert recorded == 1
    assert failures == []


def _wait_until_device_available(port: int, device: str) -> None:
    stream = EventStream(port)
    try:
        stream.wait_for(
            "device.health", lambda data: data["device"] == device and data["available"]
        )
    finally:
        stream.close()


def _outbox_rows(database: Path) -> int:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return connection.execute("SELECT count(*) FROM outbox").fetchone()[0]
    finally:
        connection.close()


def _status(daemon: Daemon) -> dict[str, Any]:
    result = run_cli("status", "--json", "--config", str(daemon.config))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _recorded_health(daemon: Daemon, name: str) -> bool | None:
    states = {device["name"]: device for device in _status(daemon)["devices"]}
    return states[name]["available"]


def _wait_for_recorded(daemon: Daemon, name: str, available: bool | None) -> None:
    deadline = time.monotonic() + WAIT
    while _recorded_health(daemon, name) is not available:
        assert time.monotonic() < deadline, f"status never showed {name} as {available}"
        time.sleep(0.1)


def test_status_shows_device_health(rig: Rig) -> None:
    scanner = rig.scanners["health"]
    mark = rig.stream.mark()
    scanner.unplug()
    rig.stream.wait_for("device.health", lambda data: data["device"] == "dev-health", after=mark)
    try:
        _wait_for_recorded(rig.daemon, "dev-health", False)
        unplugged = _status(rig.daemon)
        text = run_cli("status", "--config", str(rig.daemon.config)).stdout
    finally:
        scanner.replug()
    _wait_for_recorded(rig.daemon, "dev-health", True)

    states = {device["name"]: device for device in unplugged["devices"]}
    assert states["dev-health"]["error"]
    assert states["dev-unattended"]["available"] is True
    assert "recorded by the running daemon" in unplugged["devicesHealthSource"]
    assert "  dev-health: UNAVAILABLE since " in text
    assert "  dev-unattended: available since " in text


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_status_without_running_daemon(tmp_path: Path, stop: str) -> None:
    scanner = PtyScanner(tmp_path / "tty-gone")
    daemon = make_daemon(tmp_path / "daemon", device_table("gone", scanner.link))
    daemon.start()
    try:
        _wait_for_recorded(daemon, "dev-gone", True)
    finally:
        if stop == "sigterm":
            daemon.stop()
        else:
            daemon.kill()
        scanner.unplug()

    state = _status(daemon)

    assert state["devices"] == [
        {"name": "dev-gone", "available": None, "since": None, "error": None}
    ]
    assert state["devicesHealthSource"].startswith("daemon not running")


def test_devices_command_reads_health_over_tls(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path / "ca", "store-ca")
    server = authority.issue("connector.test", server=True, file_stem="server")
    scanner = PtyScanner(tmp_path / "tty-tls")
    extra = (
        f'[tls]\ncert_file = "{server.cert_file}"\nkey_file = "{server.key_file}"\n'
        + device_table("tls", scanner.link)
    )
    daemon = make_secure_daemon(
        tmp_path / "daemon", extra, context=client_context(authority.cert_file)
    )
    daemon.start()
    try:
        _wait_for_recorded(daemon, "dev-tls", True)
        result = run_cli("devices", "--config", str(daemon.config))
    finally:
        daemon.stop()
        scanner.unplug()

    assert result.returncode == 0, result.stderr
    assert "health: recorded by the running daemon" in result.stdout
    assert "dev-tls  kind=serial  station=station-tls  available since " in result.stdout
